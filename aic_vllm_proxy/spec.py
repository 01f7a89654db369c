"""Model specs: ``"MODEL --arg value ..."`` as given to ``/switch``, parsed like a shell would.

A spec is never run through a shell: it is split with :mod:`shlex` and handed to
``vllm serve`` as an argument list, so shell metacharacters are just characters.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

#: Flags the proxy sets itself: vLLM must listen where the proxy forwards to.
PROXY_OWNED_FLAGS = ("--host", "--port", "--uds")


def names_flag(word: str, flag: str) -> bool:
    """True if vLLM's parser reads ``word`` as the long option ``flag``: ``--flag``,
    ``--flag=value``, with underscores for dashes (vLLM turns ``--max_model_len`` into
    ``--max-model-len``), or abbreviated (argparse takes any unambiguous prefix, ``--trust-remote``).
    """
    if not word.startswith("--"):
        return False
    name = "--" + word[2:].split("=", 1)[0].replace("_", "-")
    return len(name) >= 4 and flag.startswith(name)


class SpecError(ValueError):
    """The spec cannot be used; the message says why and what to write instead."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec. ``raw`` keeps the text the user sent, for ``/status``."""

    raw: str
    model: str
    args: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        try:
            words = shlex.split(text, comments=False, posix=True)
        except ValueError as exc:  # unbalanced quotes
            raise SpecError(f"model_spec cannot be split into words ({exc}); check its quotes") from exc
        if not words:
            raise SpecError("model_spec is empty: give the model, e.g. 'meta-llama/Llama-2-7b-hf'")
        model, *args = words
        if model.startswith("-"):
            raise SpecError(
                f"model_spec must start with the model name or path, not the flag {model!r}: "
                "write 'MODEL --flag value ...'"
            )
        for word in args:
            flag = next((owned for owned in PROXY_OWNED_FLAGS if names_flag(word, owned)), None)
            if flag is not None:
                raise SpecError(
                    f"model_spec sets {flag}, which the proxy owns (it tells vLLM where to listen); "
                    "remove it: configure --vllm-host/--vllm-port on the proxy instead"
                )
        return cls(raw=text, model=model, args=tuple(args))

    @property
    def text(self) -> str:
        """The spec as one shell-quoted line (e.g. a catalogue entry resolved to its spec)."""
        return shlex.join(self.key)

    def flag_value(self, flag: str) -> str | None:
        """The value given for ``flag`` (``--flag v`` or ``--flag=v``), the last one wins."""
        value: str | None = None
        for i, word in enumerate(self.args):
            if word == flag and i + 1 < len(self.args):
                value = self.args[i + 1]
            elif word.startswith(flag + "="):
                value = word.split("=", 1)[1]
        return value

    def has_flag(self, flag: str) -> bool:
        """True if vLLM would read one of the arguments as ``flag`` (see :func:`names_flag`)."""
        return any(names_flag(word, flag) for word in self.args)

    @property
    def served_names(self) -> tuple[str, ...]:
        """The names of ``--served-model-name`` (vLLM lists each in ``/v1/models``), read as
        vLLM reads them (``--served_model_name``, ``=value``, several words); the last one given
        wins. Empty when the spec gives none (vLLM then names the model itself)."""
        names: tuple[str, ...] = ()
        for i, word in enumerate(self.args):
            if not names_flag(word, "--served-model-name"):
                continue
            if "=" in word:
                names = (word.split("=", 1)[1],)
                continue
            values = []
            for value in self.args[i + 1 :]:
                if value.startswith("-"):
                    break
                values.append(value)
            names = tuple(values)
        return names

    @property
    def served_name(self) -> str:
        """The name clients put in ``"model"``: the first ``--served-model-name`` or the model."""
        return next(iter(self.served_names), self.model)

    @property
    def key(self) -> tuple[str, ...]:
        """What makes two specs the same launch (formatting and quoting do not matter)."""
        return (self.model, *self.args)

    def argv(self, command: list[str], host: str, port: int) -> list[str]:
        """The full command line: ``vllm serve MODEL ARGS --host H --port P``."""
        return [*command, self.model, *self.args, "--host", host, "--port", str(port)]
