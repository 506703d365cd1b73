"""Structured generation in SGLang's frontend language against a server running
``--attention-backend a2ats``: ``gen`` constrained by regex and by JSON schema,
``select`` among choices, and ``fork`` for parallel branches.

    python examples/structured_programs.py [--url http://127.0.0.1:30000]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import sglang as sgl

sys.path.insert(0, str(Path(__file__).parent))
from _common import add_server_args, server_url  # noqa: E402

DATE = r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
PERSON_SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "year_of_birth": {"type": "integer"},
                   "field": {"type": "string", "enum": ["science", "art", "politics", "sport"]}},
    "required": ["name", "year_of_birth", "field"], "additionalProperties": False,
})


@sgl.function
def date_of(s, event):
    s += f"Q: On what date did {event} happen? Answer as YYYY-MM-DD.\nA: "
    s += sgl.gen("date", max_tokens=12, regex=DATE)


@sgl.function
def person_card(s, who):
    s += sgl.user(f"Describe {who} as a JSON object with name, year_of_birth and field.")
    s += sgl.assistant(sgl.gen("card", max_tokens=64, json_schema=PERSON_SCHEMA))


@sgl.function
def classify(s, sentence):
    s += f"Sentence: {sentence}\nIs the sentiment positive or negative? Answer: "
    s += sgl.select("label", choices=["positive", "negative"])


@sgl.function
def pros_and_cons(s, topic):
    s += f"Topic: {topic}.\n"
    forks = s.fork(2)
    for f, side in zip(forks, ("advantage", "disadvantage")):
        f += f"The main {side} of {topic} is that" + sgl.gen("point", max_tokens=24, stop=["\n", "."])
    s += "Advantage: " + forks[0]["point"].strip() + "\nDisadvantage: " + forks[1]["point"].strip() + "\n"


def run(url: str) -> dict:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    out = {}
    out["date"] = date_of.run(event="the first Moon landing", temperature=0)["date"]
    assert re.fullmatch(DATE, out["date"]), out["date"]
    card = json.loads(person_card.run(who="Marie Curie", temperature=0)["card"])
    assert set(card) == {"name", "year_of_birth", "field"}, card
    out["card"] = card
    labels = classify.run_batch([{"sentence": "I love this wonderful day."}, {"sentence": "This is awful and sad."}], temperature=0)
    out["labels"] = [s["label"] for s in labels]
    assert all(label in ("positive", "negative") for label in out["labels"])
    state = pros_and_cons.run(topic="electric cars", temperature=0)
    out["pros_and_cons"] = state.text().split("\n", 1)[1].strip()
    for key, value in out.items():
        print(f"{key}: {value}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p)
    args = p.parse_args(argv)
    with server_url(args) as (url, _):
        run(url)


if __name__ == "__main__":
    main()
