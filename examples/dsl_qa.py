"""Few-shot Q&A, a chat, and a skeleton of thought, written with llmir_lang.

python examples/dsl_qa.py                      # runs on the bundled model
python -m llmir_lang ir examples/dsl_qa.py:qa               # %question: an IR parameter
python -m llmir_lang ir examples/dsl_qa.py:skeleton --print-after-all
python -m llmir_lang run examples/dsl_qa.py:qa --arg "question=What is 7 + 5?"
"""

from __future__ import annotations

import llmir_lang as llmir
from llmir_lang.models import tiny_tasks

SHOTS = [("What is 3 + 4?", "7"), ("What is 10 - 2?", "8"), ("Is 12 an even number?", "True")]


@llmir.function
def qa(s, question):
    # few_shot_prompt joins the question with +, so a trace keeps it an IR parameter (an f-string
    # of a parameter cannot be traced: it raises FeatureNotSupportedError)
    s += tiny_tasks.few_shot_prompt(SHOTS, question)
    s += llmir.gen("answer", max_tokens=8, stop="\n")


@llmir.function
def chat(s, first, second):
    s += llmir.system("You are a helpful assistant.")
    s += llmir.user(first)
    s += llmir.assistant(llmir.gen("reply_1", max_tokens=32))
    s += llmir.user(second)
    s += llmir.assistant(llmir.gen("reply_2", max_tokens=32))


@llmir.function
def skeleton(s, topic):
    s += "Three short facts about " + topic + ":\n"
    forks = s.fork(3)
    forks += lambda i: f"{i + 1}." + llmir.gen("fact", max_tokens=16, stop="\n") + "\n"
    forks.join()
    s += "Summary:" + llmir.gen("summary", max_tokens=16, stop="\n")


def main() -> None:
    llmir.set_default_backend(llmir.Runtime())
    print(qa.run(question="What is 7 + 5?")["answer"])
    for state in qa.run_batch([{"question": f"What is {i} + {i}?"} for i in range(4)]):
        print(state["answer"])
    state = chat.run(first="What is 2 + 3?", second="Thank you!")
    print(state.messages())
    print(skeleton.run(topic="rivers")["fact"])


if __name__ == "__main__":
    main()
