"""Model specs: ``"MODEL --arg value ..."`` as given to ``/switch``, parsed like a shell would.

A spec is never run through a shell: it is split with :mod:`shlex` and handed to
``vllm serve`` as an argument list, so shell metacharacters are just characters.

Whatever looks for a flag in a spec (vLLM's API key, the served model names, the flags the
proxy owns, the deny-list, ``--shutdown-timeout``) asks :func:`scan_flags`, which reads the
arguments with the rules of vLLM's parser (``FlexibleArgumentParser``, an argparse parser):

- ``--flag value`` and ``--flag=value``; a flag takes as many of the following words as it
  accepts (one, one or more, ...), up to the next word that is itself an option;
- underscores for dashes in the name (``--api_key`` is ``--api-key``), and dotted keys
  (``--hf-overrides.a 1``) set their flag too, after all the other arguments;
- any unambiguous prefix of a long option (``--api-k`` is ``--api-key``; ``--po`` is refused by
  vLLM since it could be ``--port`` or ``--pooler-config``), and the short aliases (``-tp``);
- the last occurrence wins; nothing after a bare ``--`` is an option; a word that starts with
  ``-`` but is a negative number or holds a space is a value.

Abbreviations need every option of ``vllm serve``: the table is the simulator's copy of vLLM
0.32's flags (:mod:`aic_vllm_proxy.vllm_flags`), one definition for both.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from aic_vllm_proxy.vllm_flags import FLAGS, normalize_argv

#: Flags the proxy sets itself: vLLM must listen where the proxy forwards to.
PROXY_OWNED_FLAGS = ("--host", "--port", "--uds")
#: Flags the proxy sets on each rank of a model across nodes (``--nnodes N``): which rank it
#: is, where rank 0 is, and that the others serve no HTTP (docs/cluster.md).
NODE_OWNED_FLAGS = ("--node-rank", "--master-addr", "--master-port", "--headless")

#: How many words each kind of flag in the table takes at most (argparse's ``nargs``; None: any).
_MOST_VALUES: dict[str, int | None] = {
    "flag": 0,
    "bool": 0,
    "value": 1,
    "optional": 1,
    "list": None,
    "list0": None,
}
#: argparse's test for a word that is a negative number, hence a value.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


@dataclass(frozen=True)
class _Option:
    name: str  # the flag's main spelling: its first option string, e.g. "--api-key"
    most: int | None  # how many words it takes at most (None: no limit)


@lru_cache(maxsize=1)
def _vllm_options() -> dict[str, _Option]:
    """Every option string of ``vllm serve`` (with ``--no-x`` of the booleans and ``--help``)."""
    options = {"-h": _Option("--help", 0), "--help": _Option("--help", 0)}
    for names, kind, _choices, _default in FLAGS:
        strings = names.split()
        option = _Option(strings[0], _MOST_VALUES[kind])
        options.update(dict.fromkeys(strings, option))
        if kind == "bool":  # argparse.BooleanOptionalAction: --x and --no-x
            negated = ["--no-" + s[2:] for s in strings if s.startswith("--")]
            options.update(dict.fromkeys(negated, _Option(negated[0], 0)))
    return options


def flag_name(flag: str) -> str:
    """The main spelling of ``flag`` (``--api_key`` -> ``--api-key``, ``-tp`` ->
    ``--tensor-parallel-size``); a flag vLLM does not have keeps its own (with dashes)."""
    name = "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag
    option = _vllm_options().get(name)
    return option.name if option else name


@dataclass(frozen=True)
class FlagUse:
    """An option in a spec as vLLM's parser reads it: ``flags`` is the flag it names (its main
    spelling), or the several it could name when it is an ambiguous abbreviation (which vLLM
    refuses); ``values`` are the words it takes."""

    word: str
    flags: tuple[str, ...]
    values: tuple[str, ...]


def _read_option(word: str, options: Mapping[str, _Option]) -> tuple[tuple[str, ...], str | None] | None:
    """What argparse makes of ``word`` (``ArgumentParser._parse_optional``): None for a value,
    else the option strings it could be (none: an unknown option) and its ``=`` value."""
    if not word.startswith("-") or word == "-":
        return None
    if word in options:
        return (word,), None
    head, eq, tail = word.partition("=")
    if eq and head in options:
        return (head,), tail
    if word.startswith("--"):  # an abbreviation of a long option (``--api-k=K``)
        found = [(s, tail if eq else None) for s in options if s.startswith(head)]
    else:  # a short option with its value attached (``-qfp8``) or an abbreviated one
        found = [
            (s, word[2:]) if s == word[:2] else (s, None)
            for s in options
            if s == word[:2] or s.startswith(word)
        ]
    if len(found) == 1:
        return (found[0][0],), found[0][1]
    if found:
        return tuple(s for s, _ in found), None
    if _NEGATIVE_NUMBER.match(word) or " " in word:
        return None
    return (), None


def scan_flags(args: Sequence[str], extra: Iterable[str] = ()) -> tuple[FlagUse, ...]:
    """The options vLLM's parser reads in ``args`` (a spec's arguments), in the order it applies
    them. ``extra`` adds flags the table does not know (e.g. a deny-list entry for a newer vLLM)."""
    options = _vllm_options()
    unknown = [flag for flag in extra if flag not in options]
    if unknown:
        options = {**options, **{flag: _Option(flag, 1) for flag in unknown}}
    words = normalize_argv(args)
    uses: list[FlagUse] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "--":  # argparse: everything after it is positional
            break
        read = _read_option(word, options)
        if read is None or not read[0]:
            continue  # a value no option takes, or an unknown option: vLLM refuses both
        strings, explicit = read
        if len(strings) > 1:
            uses.append(FlagUse(word, tuple(dict.fromkeys(options[s].name for s in strings)), ()))
            continue
        option = options[strings[0]]
        values: list[str] = []
        if explicit is not None:
            values.append(explicit)  # taken even by a flag without value (vLLM refuses that)
        else:
            while (
                i < len(words)
                and (option.most is None or len(values) < option.most)
                and words[i] != "--"
                and _read_option(words[i], options) is None
            ):
                values.append(words[i])
                i += 1
        uses.append(FlagUse(word, (option.name,), tuple(values)))
    return tuple(uses)


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
        for use in scan_flags(args):
            owned = next((flag for flag in use.flags if flag in PROXY_OWNED_FLAGS + NODE_OWNED_FLAGS), None)
            if owned is None:
                continue
            how = "sets" if len(use.flags) == 1 else f"may set (it abbreviates {', '.join(use.flags)})"
            if owned in PROXY_OWNED_FLAGS:
                raise SpecError(
                    f"model_spec {how} {owned} with {use.word!r}, which the proxy owns (it tells vLLM "
                    "where to listen); remove it: configure --vllm-host/--vllm-port on the proxy instead"
                )
            raise SpecError(
                f"model_spec {how} {owned} with {use.word!r}, which the proxy owns for a model across "
                "nodes (it runs rank 0 and tells each agent's rank where rank 0 is); remove it: "
                "give only --nnodes N (docs/cluster.md)"
            )
        return cls(raw=text, model=model, args=tuple(args))

    @property
    def text(self) -> str:
        """The spec as one shell-quoted line (e.g. a catalogue entry resolved to its spec)."""
        return shlex.join(self.key)

    def flag_values(self, flag: str) -> tuple[str, ...] | None:
        """The words vLLM takes for ``flag`` in any spelling (see :func:`scan_flags`), from the
        last occurrence; None when the spec does not give it."""
        name = flag_name(flag)
        uses = [use for use in scan_flags(self.args, (name,)) if use.flags == (name,)]
        return uses[-1].values if uses else None

    def flag_value(self, flag: str) -> str | None:
        """The (first) value given for ``flag``, the last occurrence wins; None if there is none."""
        return next(iter(self.flag_values(flag) or ()), None)

    def has_flag(self, flag: str) -> bool:
        """True if vLLM reads one of the arguments as ``flag``, or refuses one as an ambiguous
        abbreviation that could be ``flag`` (so that a policy check errs on the safe side)."""
        name = flag_name(flag)
        return any(name in use.flags for use in scan_flags(self.args, (name,)))

    @property
    def served_names(self) -> tuple[str, ...]:
        """The names of ``--served-model-name`` (vLLM lists each in ``/v1/models``), read as
        vLLM reads them; the last one given wins. Empty when the spec gives none (vLLM then
        names the model itself)."""
        return self.flag_values("--served-model-name") or ()

    @property
    def served_name(self) -> str:
        """The name clients put in ``"model"``: the first ``--served-model-name`` or the model."""
        return next(iter(self.served_names), self.model)

    @property
    def key(self) -> tuple[str, ...]:
        """What makes two specs the same launch (formatting and quoting do not matter)."""
        return (self.model, *self.args)

    @property
    def nnodes(self) -> int:
        """How many nodes it spans (``--nnodes``; 1 when not given or not a whole number, which
        vLLM then reports itself)."""
        value = self.flag_value("--nnodes")
        try:
            return max(int(value), 1) if value is not None else 1
        except ValueError:
            return 1

    @staticmethod
    def rank_args(rank: int, master_addr: str, master_port: int) -> list[str]:
        """What the proxy adds for rank ``rank`` of a model across nodes: rank 0 leads (and
        serves HTTP), the others join it ``--headless``."""
        args = ["--node-rank", str(rank), "--master-addr", master_addr, "--master-port", str(master_port)]
        return args if rank == 0 else [*args, "--headless"]

    def argv(self, command: list[str], host: str, port: int) -> list[str]:
        """The full command line: ``vllm serve MODEL ARGS --host H --port P``."""
        return [*command, self.model, *self.args, "--host", host, "--port", str(port)]
