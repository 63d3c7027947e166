"""tunesmith: turn an open LLM into a specialist — fine-tune, align, evaluate, export.

The Python API mirrors the CLI (imports are lazy, so `import tunesmith` is instant):

    import tunesmith as ts
    recipe = ts.load_recipe("recipes/lora-sft.yaml", ["data.train=my.jsonl", "train.steps=100"])
    result = ts.train(recipe)                                    # -> RunResult (run_dir, output, summary)
    model, tok = ts.load_for_inference("smollm2-135m-instruct", adapter=result.run_dir)
    print(ts.generate(model, tok, ["How many grams are in 3 kilograms?"])[0])
    ts.export_merged("smollm2-135m-instruct", result.run_dir / "adapter", "merged/")
    ts.export_merged_gguf("smollm2-135m-instruct", result.run_dir / "adapter", "tuned.gguf", "f16")
    ts.serve("smollm2-135m-instruct", {"tuned": str(result.run_dir)})     # OpenAI API on 127.0.0.1:8000
"""
__version__ = "0.1.0"

_API = {
    "load_recipe": "tunesmith.recipe",
    "Recipe": "tunesmith.recipe",
    "train": "tunesmith.train.loop",
    "RunResult": "tunesmith.train.loop",
    "load_model": "tunesmith.models.load",
    "load_data": "tunesmith.data",
    "generate": "tunesmith.infer.generate",
    "load_for_inference": "tunesmith.infer.generate",
    "export_merged": "tunesmith.export.merged",
    "export_gguf": "tunesmith.export.gguf",
    "export_merged_gguf": "tunesmith.export.gguf",
    "export_gguf_lora": "tunesmith.export.gguf",
    "load_fused": "tunesmith.infer.fuse",
    "serve": "tunesmith.serve",
    "save_adapter": "tunesmith.export.peft_format",
    "load_adapter": "tunesmith.export.peft_format",
}

__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
