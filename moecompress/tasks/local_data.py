"""Dataset loader for the example lm-eval tasks in this folder (no network).

Used from a task YAML as ``custom_dataset: !function local_data.load`` with
``dataset_kwargs: {data_files: {test: FILE.jsonl}}``; relative paths are resolved against this
folder, so the shipped tasks work from any working directory. Needs lm-eval >= 0.4.9.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_files=None, **_metadata):
    import datasets

    files = {split: str(HERE / f) if not Path(f).is_absolute() else f for split, f in (data_files or {}).items()}
    return datasets.load_dataset("json", data_files=files)
