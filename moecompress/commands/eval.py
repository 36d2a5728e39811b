"""`moecompress eval`: perplexity, KL to the base, lm-eval tasks; tables, JSON and markdown."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ._common import console, err_console, user_errors, write_json


def register(app: typer.Typer) -> None:
    @app.command()
    def eval(
        model: str = typer.Argument(..., help="Checkpoint folder or Hub id to evaluate."),
        base: Optional[str] = typer.Option(None, "--base", help="Base model: adds KL(base||model), top-1 agreement "
                                           "and the base's numbers side by side."),
        ppl: List[Path] = typer.Option([], "--ppl", help="UTF-8 text file for perplexity (repeat for several)."),
        tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated lm-eval tasks, e.g. "
                                            "moecompress_python_mc,hellaswag (needs the 'eval' extra)."),
        include_path: List[Path] = typer.Option([], "--include-path", help="Folder of extra lm-eval task YAMLs "
                                                "(repeatable); the shipped moecompress/tasks is always included."),
        limit: Optional[float] = typer.Option(None, "--limit", help="At most this many examples per task "
                                              "(a fraction if < 1)."),
        num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples per task."),
        seq_len: int = typer.Option(512, "--seq-len", help="Perplexity window length in tokens."),
        stride: Optional[int] = typer.Option(None, "--stride", help="Window advance (default: --seq-len, i.e. "
                                             "non-overlapping windows)."),
        max_tokens: int = typer.Option(20_000, "--max-tokens", help="Score the first N tokens of each file "
                                       "(0 = the whole file)."),
        batch_size: int = typer.Option(1, "--batch-size", help="Windows / lm-eval requests per forward pass."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder or Hub id "
                                                "(default: the model's, else the base's)."),
        dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16, float16 or auto "
                                            "(default: float32 on CPU, the checkpoint's dtype on GPU)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default: cuda if "
                                             "available)."),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here ('-' = stdout)."),
        markdown: Optional[Path] = typer.Option(None, "--markdown", help="Write the table as markdown here."),
    ) -> None:
        """Perplexity on text files, KL and top-1 agreement against --base, and lm-eval tasks.

        Perplexity: non-overlapping windows of --seq-len tokens over the first --max-tokens tokens
        of each file (the testbed's reference convention), context reset at each window.
        """
        from ..errors import MoECompressError
        from ..evaluate import evaluate_checkpoint, markdown_table, rich_table, settings_line

        task_list = [t.strip() for t in (tasks or "").split(",") if t.strip()]
        with user_errors():
            if not ppl and not task_list:
                raise MoECompressError("nothing to evaluate; pass --ppl FILE and/or --tasks T1,T2")
            if limit is not None and limit <= 0:
                raise MoECompressError(f"--limit must be positive (got {limit})")
            result = evaluate_checkpoint(
                model, base=base, tokenizer=tokenizer, dtype=dtype, device=device, ppl_files=list(ppl),
                tasks=task_list, include_path=list(include_path),
                limit=int(limit) if limit is not None and limit >= 1 else limit, num_fewshot=num_fewshot,
                seq_len=seq_len, stride=stride, max_tokens=max_tokens or None, batch_size=batch_size,
                progress=lambda msg: err_console.print(f"[dim]{msg}[/]", highlight=False))
        if json_out is not None:
            write_json(json_out, result)
        if markdown is not None:
            markdown.write_text(markdown_table(result))
        if json_out is None or str(json_out) != "-":
            console.print(rich_table(result, title=f"{model}" + (f" vs {base}" if base else "")))
            console.print(f"[dim]{settings_line(result)}[/]", highlight=False)
