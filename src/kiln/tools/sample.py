"""Generate from a trained GPT or T5 run, and score code generation on HumanEval by execution.

  python -m kiln.tools.sample --workdir runs/x --prompt "In the beginning" [--prompt ...]
  python -m kiln.tools.sample --workdir runs/x --input-file prompts.jsonl --output-file out.jsonl
  python -m kiln.tools.sample --workdir runs/x --humaneval --strategy sample --temperature 0.8 \
      --num-samples 10 --k 1,10 --output-file samples.jsonl

Prompts are formatted as the run was trained: a fine-tune on a generation task applies its
template (and GPT's [SEP]); a pre-trained GPT continues `bos + prompt`, a pre-trained T5 decodes
from `prompt + eos` (`--raw` skips the template). Decoding options are the flags of
`kiln.decoding.DecodeOptions` (`--stop-id` ends a row at a token id besides eos); `--stop`
strings cut the generated text. Parameters are restored
onto a mesh of every local device, rows sharded over it (`kiln.decoding.generate`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from kiln import decoding, finetuning, models, restore, sharding
from kiln.data import finetune, tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.data.objectives import Layout
from kiln.errors import KilnError
from kiln.tools import cli, code_eval, host_memory

# Where a HumanEval completion ends: the next top-level statement (Chen et al. 2021).
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
_PROMPT_EXAMPLE = '{"id": "a", "prompt": "In the beginning"}'


@dataclasses.dataclass
class Generator:
    """A restored run, ready to generate."""

    workdir: str
    step: int
    config: ml_collections.ConfigDict
    model: Any
    params: Any
    tokenizer: tokenizer_lib.Tokenizer
    task: tasks.Task | None
    mesh: jax.sharding.Mesh

    @property
    def layout(self) -> Layout:
        """The run's model layout (decoder: continues the prompt; encoder-decoder: answers)."""
        return models.family(self.config.model.family).layout

    def encode(
        self, text: str, max_new_tokens: int, raw: bool = False, truncate: bool = False
    ) -> list[int]:
        """The prompt ids for `text`, formatted as the run was trained (see module docstring).

        With `truncate`, a raw prompt keeps its last ids, as many as leave room for
        max_new_tokens (GPT) or fit max_len (T5); a task's prompt is always cut to fit."""
        config, tok = self.config, self.tokenizer
        if self.task is not None and not raw:
            example = tasks.Example("prompt", text, "")
            return finetune.generation_prompt(
                self.task,
                self.layout,
                tok,
                example,
                seq_len=config.data.seq_len,
                max_new_tokens=max_new_tokens,
                template=finetuning.template(config.task, self.task),
            )
        ids, max_len = tok.encode(text), config.model.max_len
        if self.layout == Layout.DECODER:
            keep = max(max_len - max_new_tokens - 1, 1)
            return [tok.bos_id, *(ids[-keep:] if truncate else ids)]
        return [*(ids[-(max_len - 1) :] if truncate else ids), tok.eos_id]

    def generate(
        self,
        texts: Sequence[str],
        options: decoding.DecodeOptions,
        *,
        stops: Sequence[str] = (),
        raw: bool = False,
        truncate: bool = False,
        batch_size: int = 16,
    ) -> list[str]:
        """The generated text of each prompt, cut before the first of `stops` (`raw` and
        `truncate` as in `encode`)."""
        check_prompts(texts)
        prompts = [self.encode(text, options.max_new_tokens, raw, truncate) for text in texts]
        tok = self.tokenizer
        ids = decoding.generate(
            self.model,
            self.params,
            prompts,
            options,
            eos_id=tok.eos_id,
            bos_id=tok.bos_id,
            batch_size=batch_size,
            mesh=self.mesh,
        )
        return [cut_at_stops(tok.decode(row), stops) for row in ids]


def check_prompts(texts: Sequence[str]) -> None:
    """Fails on an empty prompt, naming it."""
    for i, text in enumerate(texts):
        if not text.strip():
            raise KilnError(f"Prompt {i} is empty: give every prompt some text.")


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any of `stops`."""
    end = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:end]


def load(workdir: str, step: int = -1) -> Generator:
    """Restores a GPT or T5 run's parameters (checkpoint `step`, -1 = latest) for generation."""
    source = restore.resolve(ml_collections.ConfigDict({"workdir": workdir, "step": step}), "--")
    config = source.config
    family = models.family(config.model.family)
    if not family.generates:
        raise KilnError(
            f"--workdir={workdir!r} is a {family.name} run; kiln.tools.sample generates with"
            " decoder (gpt) and encoder-decoder (t5) runs (a masked LM does not generate)."
        )
    has_task = config.get("task", {}).get("name")
    task = finetuning.load(config.task, config.data.data_dir) if has_task else None
    if task is not None and finetuning.uses_head(config.model.family, task):
        raise KilnError(
            f"--workdir={workdir!r} fine-tuned a classification head on {task.name}; it predicts"
            " labels, not text. Sample from its pre-training run, or use its predictions_*.jsonl."
        )
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
    model, params = restore.params_for_inference(source, mesh)
    tok = tokenizer_lib.load_tokenizer(source.tokenizer_path)
    return Generator(source.workdir, source.step, config, model, params, tok, task, mesh)


def read_prompts(path: str) -> list[dict[str, str]]:
    """Rows of a JSONL file with a "prompt" (or "input") field and an optional "id"; a
    KilnError naming the line for anything else (not UTF-8, not JSON, no prompt string)."""
    rows = []
    file = pathlib.Path(path).expanduser()
    for number, record in cli.read_jsonl(file, "--input-file", _PROMPT_EXAMPLE):
        text = record.get("prompt", record.get("input"))
        if not isinstance(text, str):
            raise KilnError(
                f'{path}, line {number}: no "prompt" (or "input") string field; write each'
                f" line as e.g. {_PROMPT_EXAMPLE}."
            )
        rows.append({"id": str(record.get("id", len(rows))), "prompt": text})
    if not rows:
        raise KilnError(f"--input-file={path!r} has no prompts.")
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kiln.tools.sample", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--workdir", required=True, help="a finished gpt or t5 run")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step; -1 = the latest")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    source.add_argument("--input-file", help='JSONL with "prompt" (or "input") and "id"')
    source.add_argument("--humaneval", action="store_true", help="HumanEval problems; pass@k")
    p.add_argument("--output-file", help="write JSONL here instead of printing")
    defaults = decoding.DecodeOptions()
    p.add_argument("--strategy", default=defaults.strategy, choices=decoding.STRATEGIES)
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--temperature", type=float, default=defaults.temperature)
    p.add_argument("--top-k", type=int, default=defaults.top_k)
    p.add_argument("--top-p", type=float, default=defaults.top_p)
    p.add_argument("--num-beams", type=int, default=defaults.num_beams)
    p.add_argument("--length-penalty", type=float, default=defaults.length_penalty)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--num-samples", type=int, default=1, help="generations per prompt")
    p.add_argument("--stop", action="append", default=[], help="cut the text at this string")
    p.add_argument(
        "--stop-id", action="append", type=int, default=[], help="a token id that ends a row"
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts per decoding call")
    p.add_argument("--raw", action="store_true", help="no task template: the text as it is")
    p.add_argument(
        "--truncate",
        action="store_true",
        help="keep the end of a prompt too long for the model (always on with --humaneval)",
    )
    p.add_argument("--problems", type=int, default=0, help="humaneval: the first N; 0 = all")
    p.add_argument("--k", default="1,10", help="humaneval: pass@k values")
    p.add_argument("--timeout", type=float, default=10.0, help="humaneval: seconds per program")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    host_memory.keep_freed_memory()  # Process-wide, so here and not on import: before JAX starts.
    return cli.run("kiln.tools.sample", lambda: _run(args))


def _check_args(args: argparse.Namespace) -> None:
    """The numeric flags in range and the output file writable, before anything is loaded."""
    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--num-samples", args.num_samples, 1),
        ("--problems", args.problems, 0),
        ("--step", args.step, -1),
    ):
        if value < low:
            raise KilnError(f"{flag}={value} must be at least {low}.")
    if not (0 < args.timeout < float("inf")):
        raise KilnError(f"--timeout={args.timeout} must be a positive number of seconds.")
    if args.output_file is not None:
        cli.check_output_file(args.output_file, "--output-file")


def _run(args: argparse.Namespace) -> None:
    _check_args(args)
    options = decoding.decode_options(
        strategy=args.strategy,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        stop_ids=args.stop_id,
        seed=args.seed,
    )
    if args.num_samples > 1 and options.strategy != "sample":
        raise KilnError(
            f"--num-samples={args.num_samples} needs --strategy sample: {options.strategy}"
            " decoding gives the same text every time."
        )
    if args.humaneval:
        problems = code_eval.load_humaneval()[: args.problems or None]
        rows = [{"id": p.task_id, "prompt": p.prompt} for p in problems]
        stops = args.stop or list(HUMANEVAL_STOPS)
    else:
        rows = (
            read_prompts(args.input_file)
            if args.input_file
            else [{"id": str(i), "prompt": text} for i, text in enumerate(args.prompt)]
        )
        stops = args.stop
    texts = [row["prompt"] for row in rows for _ in range(args.num_samples)]
    check_prompts(texts)
    generator = load(args.workdir, args.step)
    generated = generator.generate(
        texts,
        options,
        stops=stops,
        raw=args.raw,
        truncate=args.truncate or args.humaneval,
        batch_size=args.batch_size,
    )
    outputs = [
        {**row, "sample": j, "generation": generated[i * args.num_samples + j]}
        for i, row in enumerate(rows)
        for j in range(args.num_samples)
    ]
    if jax.process_index() != 0:  # Multi-host: every process decodes, process 0 reports.
        return
    if args.humaneval:
        _score_humaneval(problems, outputs, args)
    elif args.output_file:
        _write_jsonl(args.output_file, outputs)
        print(f"Wrote {len(outputs)} generations to {args.output_file}")
    else:
        for out in outputs:
            print(f"--- {out['id']}" + (f" #{out['sample']}" if args.num_samples > 1 else ""))
            continues = generator.task is None and generator.layout == Layout.DECODER
            print(out["prompt"] + out["generation"] if continues else out["generation"])


def _score_humaneval(
    problems: list[code_eval.Problem], outputs: list[dict], args: argparse.Namespace
) -> None:
    completions: dict[str, list[str]] = {}
    for out in outputs:
        completions.setdefault(out["id"], []).append(out["generation"])
    ks = [k for k in code_eval.parse_ks(args.k) if k <= args.num_samples]
    if not ks:
        raise KilnError(f"--k={args.k}: every k exceeds --num-samples={args.num_samples}.")
    result = code_eval.evaluate(problems, completions, ks=ks, timeout_s=args.timeout)
    samples = [{"task_id": out["id"], "completion": out["generation"]} for out in outputs]
    if args.output_file:
        outcomes = [o for p in problems for o in result["results"][p.task_id]]
        _write_jsonl(
            args.output_file,
            [
                {**sample, "passed": o.passed, "status": o.status}
                for sample, o in zip(samples, outcomes, strict=True)
            ],
        )
    scores = ", ".join(f"pass@{k} {result[f'pass@{k}']:.4f}" for k in ks)
    print(
        f"HumanEval: {len(problems)} problems x {args.num_samples} samples: {scores}"
        f" (programs run with {code_eval.network_isolation()} network isolation)"
    )


def _write_jsonl(path: str, rows: list[dict]) -> None:
    cli.check_output_file(path, "--output-file")
    cli.write_text(path, "".join(json.dumps(row) + "\n" for row in rows), "--output-file")


if __name__ == "__main__":
    sys.exit(main())
