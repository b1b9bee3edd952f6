"""Streaming and async with llmir_lang: ``text_iter``, ``arun`` and ``text_async_iter``.

python examples/dsl_stream_async.py
"""

from __future__ import annotations

import asyncio

import llmir_lang as llmir


@llmir.function
def chat(s, questions):
    s += llmir.system("You are a helpful assistant.")
    for i, q in enumerate(questions):
        s += llmir.user(q)
        s += llmir.assistant(llmir.gen(f"answer_{i}", max_tokens=32))


async def ask_concurrently(questions: list[str]) -> list[str]:
    """Several programs at once from one event loop; each answer streamed as it is generated."""

    async def one(q: str) -> str:
        state = await chat.arun(questions=[q], stream=True)
        return "".join([chunk async for chunk in state.text_async_iter("answer_0")])

    return await asyncio.gather(*(one(q) for q in questions))


def main() -> None:
    llmir.set_default_backend(llmir.Runtime())
    state = chat.run(questions=["Hi", "What is 3 + 4?", "Thank you!"], stream=True)
    for chunk in state.text_iter():  # the whole conversation, as it is produced
        print(chunk, end="", flush=True)
    print()
    print(asyncio.run(ask_concurrently(["What is 2 + 2?", "What is your name?", "Who made you?"])))


if __name__ == "__main__":
    main()
