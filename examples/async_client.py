"""The async client: switch a model, then send several chats at once and stream one of them.

    AIC_VLLM_PROXY_URL=http://gpu-node:8224 python examples/async_client.py [MODEL [VLLM ARGS...]]

Without arguments it loads ``Qwen/Qwen3-0.6B`` with ``--max-model-len 4096``. To try it without a
GPU, run the proxy with the bundled simulator: ``aic-vllm-proxy --simulator``.
"""

from __future__ import annotations

import asyncio
import shlex
import sys

from aic_vllm_proxy.client import AsyncVLLMProxyClient


async def main(model: str, args: str) -> None:
    async with AsyncVLLMProxyClient() as proxy:  # URL and API key from the environment
        status = await proxy.status()
        print(f"proxy {proxy.proxy_url}: {status.state.value}, model {status.model}")

        result = await proxy.switch(model, args)  # live vLLM log, then a summary line
        print(f"{model} ready (changed={result.changed}, load {result.load_seconds} s)")
        served = await proxy.model_name() or model

        client = proxy.get_async_openai_client()
        questions = ["What is 2 + 2?", "Name a prime number.", "Say hi in French."]
        answers = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=served, messages=[{"role": "user", "content": q}], max_tokens=32
                )
                for q in questions
            )
        )
        for question, answer in zip(questions, answers, strict=True):
            print(f"Q: {question}\nA: {answer.choices[0].message.content}\n")

        stream = await client.chat.completions.create(
            model=served,
            messages=[{"role": "user", "content": "Count to five."}],
            max_tokens=32,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()
        await client.close()

        print((await proxy.logs(lines=3)).rstrip())
        await proxy.stop()


if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "Qwen/Qwen3-0.6B"
    extra = shlex.join(sys.argv[2:]) if len(sys.argv) > 1 else "--max-model-len 4096"
    asyncio.run(main(name, extra))
