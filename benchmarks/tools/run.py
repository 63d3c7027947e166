"""Does training on tool-calling chats teach the embedded SmolLM2-135M-Instruct to call tools?

SmolLM2's chat template does not render tools, so the chats of examples/tools.jsonl are trained with
data.tool_format=inline (schemas in the system prompt, calls as <tool_call> JSON) and the held-out
prompts are asked in the same inline form. Scored before and after a short LoRA SFT run, greedy:
  - call: the answer holds one <tool_call> whose name and arguments equal the expected call;
  - valid: the answer holds a <tool_call> with parseable JSON {name, arguments} (right or wrong);
  - no call: small-talk prompts answered without a call.

    nice -n 5 python benchmarks/tools/run.py --steps 40 --out benchmarks/tools/results.json
"""
import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

from make_tools import SMALL_TALK, TOOLS, conversion, weather  # noqa: E402

from tunesmith.data.tools import inline_tools, parse_tools  # noqa: E402
from tunesmith.infer.generate import generate, load_for_inference  # noqa: E402
from tunesmith.recipe import load_recipe  # noqa: E402
from tunesmith.train.loop import train  # noqa: E402

CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*(?:</tool_call>|$)", re.S)


def test_set(n: int, seed: int, seen: set[str]) -> list[dict]:
    """Held-out prompts: conversions not asked in the training file, weather questions, small talk."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < n:
        kind = len(cases) % 5
        if kind == 4:
            question = SMALL_TALK[rng.randrange(len(SMALL_TALK))][0] if rng.random() < 0.5 else "Good morning!"
            cases.append({"kind": "small talk", "question": question, "call": None})
            continue
        question, call, _, _ = (weather if kind == 3 else conversion)(rng)
        if kind != 3 and question in seen:
            continue
        cases.append({"kind": "weather" if kind == 3 else "conversion", "question": question, "call": call["function"]})
    return cases


def score(answer: str, case: dict) -> dict:
    found = CALL.search(answer)
    parsed = None
    if found:
        try:
            parsed = json.loads(found.group(1))
        except json.JSONDecodeError:
            parsed = None
    valid = isinstance(parsed, dict) and isinstance(parsed.get("name"), str) and isinstance(parsed.get("arguments"), dict)
    if case["call"] is None:
        return {"valid": valid, "right": found is None}
    right = valid and parsed["name"] == case["call"]["name"] and parsed["arguments"] == case["call"]["arguments"]
    return {"valid": valid, "right": right}


def evaluate(model_name, adapter, cases) -> dict:
    model, tok = load_for_inference(model_name, adapter)
    tools = parse_tools(TOOLS, "tools", "tools")
    prompts = [inline_tools([{"role": "user", "content": c["question"]}], tools) for c in cases]
    start = time.perf_counter()
    answers = generate(model, tok, prompts, max_new_tokens=48, batch_size=8)
    seconds = time.perf_counter() - start
    rows = [{**c, "answer": a, **score(a, c)} for c, a in zip(cases, answers)]
    out = {"seconds": round(seconds, 1), "examples": rows[:6]}
    for kind in ("conversion", "weather", "small talk"):
        sel = [r for r in rows if r["kind"] == kind]
        out[kind] = {"n": len(sel), "right": sum(r["right"] for r in sel), "valid": sum(r["valid"] for r in sel)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tests", type=int, default=50)
    ap.add_argument("--runs", default="runs/bench-tools")
    ap.add_argument("--out", default="benchmarks/tools/results.json")
    args = ap.parse_args()

    data = ROOT / "examples" / "tools.jsonl"
    seen = {json.loads(line)["messages"][0]["content"] for line in data.read_text().splitlines()}
    cases = test_set(args.tests, seed=99, seen=seen)
    results = {"steps": args.steps, "lr": args.lr, "before": evaluate("smollm2-135m-instruct", None, cases)}
    print(json.dumps({k: v for k, v in results["before"].items() if k != "examples"}))

    recipe = load_recipe(str(ROOT / "recipes" / "lora-sft.yaml"), [
        f"data.train={data}", "data.tool_format=inline", "data.val_fraction=0", f"train.steps={args.steps}",
        f"train.lr={args.lr}", "train.eval_every=0", "train.save_every=0", f"output_dir={args.runs}", "name=tools"])
    start = time.perf_counter()
    run = train(recipe)
    results["train_seconds"] = round(time.perf_counter() - start, 1)
    results["after"] = evaluate(None, str(run.run_dir), cases)
    print(json.dumps({k: v for k, v in results["after"].items() if k != "examples"}))
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
