# %% [markdown]
# # Switch between two models and chat
#
# A notebook-style script (the `# %%` markers are cells in VS Code / Jupytext; the same cells
# are in `notebook_switch_and_chat.ipynb`). It needs the client extra:
# `pip install "aic-vllm-proxy[client]"`.
#
# Point it at your proxy with `AIC_VLLM_PROXY_URL` (default `http://127.0.0.1:8224`). To try it
# without a GPU, run the proxy with the bundled simulator: `aic-vllm-proxy --simulator`.

# %%
import os

from aic_vllm_proxy.client import SwitchError, VLLMProxyClient

model2spec = {
    "meta-llama/Llama-2-7b-hf": "--tensor-parallel-size 1 --gpu-memory-utilization 0.9",
    "mistralai/Mistral-7B-Instruct-v0.2": "--tensor-parallel-size 1",
}
proxy = VLLMProxyClient(proxy_url=os.environ.get("AIC_VLLM_PROXY_URL"), model2spec=model2spec)
print(proxy.status())

# %% [markdown]
# Load the first model. The cell shows the vLLM log live (weights loading, CUDA graph capture,
# errors) and ends with a one-line summary. `progress=False` silences it.

# %%
result = proxy.switch("meta-llama/Llama-2-7b-hf")
print(f"changed={result.changed}, loading took {result.load_seconds} s")

# %%
client = proxy.get_openai_client()
resp = client.chat.completions.create(
    model=proxy.model_name() or "meta-llama/Llama-2-7b-hf",
    messages=[{"role": "user", "content": "Write a haiku about GPUs."}],
    max_tokens=64,
)
print(resp.choices[0].message.content)

# %% [markdown]
# Switch to the second model and stream the answer token by token.

# %%
proxy.switch("mistralai/Mistral-7B-Instruct-v0.2")
stream = client.chat.completions.create(
    model="mistralai/Mistral-7B-Instruct-v0.2",
    messages=[{"role": "user", "content": "Explain tensor parallelism in two sentences."}],
    max_tokens=64,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

# %% [markdown]
# Switching to what is already loaded restarts nothing; `force=True` would.

# %%
again = proxy.switch("mistralai/Mistral-7B-Instruct-v0.2", progress=False)
print(again.changed, "-", again.message)

# %% [markdown]
# Explicit arguments replace those of `model2spec` (and let you load any model). A start failure
# raises `SwitchError` with vLLM's exit code and the end of its log.

# %%
try:
    proxy.switch("meta-llama/Llama-2-7b-hf", "--no-such-flag", progress=False)
except SwitchError as error:
    print("switch failed, exit code", error.exit_code)
    print("\n".join(error.log_tail[-3:]))

# %%
print(proxy.logs(lines=5))
proxy.stop()
print(proxy.status().state.value)
