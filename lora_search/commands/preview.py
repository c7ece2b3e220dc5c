"""`python -m lora_search preview [overrides]`: rows exactly as the model will see them, the trained part marked,
then the data report and token counts. Loads the tokenizer only, never model weights, and writes nothing."""

from __future__ import annotations

from lora_search.checks.run_config import validate
from lora_search.commands import preflight
from lora_search.core.errors import ConfigError
from lora_search.data import quality_report
from lora_search.data.load import load_task_data
from lora_search.models import loaders

LEGEND = ("⟦ … ⟧ the completion: the tokens the loss is computed on (everything else is context, not trained)\n"
          "⏎ a newline in the text · ✂ trainer.max_length cuts the row here: what follows is never seen")


def _visible(text: str) -> str:
    return text.replace("\n", "⏎\n")


def render_row(ids: list[int], start: int, tokenizer, max_length: int) -> str:
    """One tokenized row as text: the prompt plain, the completion between ⟦ ⟧, a ✂ where max_length cuts it;
    lines holding trained text start with ▶."""
    cut = min(len(ids), max_length)
    pieces = [_visible(tokenizer.decode(ids[: min(start, cut)]))]
    if start < cut:
        pieces.append("⟦" + _visible(tokenizer.decode(ids[start:cut])) + "⟧")
    if cut < len(ids):
        pieces.append("✂" + _visible(tokenizer.decode(ids[cut:])))
    text = "".join(pieces)
    lines, inside = [], False
    for line in text.split("\n"):
        trained = inside or "⟦" in line
        if "⟦" in line:
            inside = "⟧" not in line.split("⟦", 1)[1]
        elif "⟧" in line:
            inside = False
        lines.append(("▶ " if trained else "  ") + line)
    return "\n".join(lines)


PAIR_LEGEND = ("each pair: the prompt as the model sees it, then ⟦ the chosen answer ⟧ and ⟦ the rejected answer ⟧ "
               "(the tokens DPO compares; the prompt is context)\n"
               "⏎ a newline in the text · ✂ trainer.max_length cuts the sequence here: what follows is never seen")


def _pair(row: dict, i: int, total: int, tokenizer, max_length: int) -> str:
    """One preference pair: the prompt once, then the chosen and the rejected answer as DPOTrainer tokenizes them."""
    chosen, rejected, start = quality_report.pair_tokens(row, tokenizer)
    cut = " (cut at max_length)" if max(len(chosen), len(rejected)) > max_length else ""
    head = (f"── train pair {i + 1} of {total}: {start} prompt tokens, {len(chosen) - start} chosen, "
            f"{len(rejected) - start} rejected{cut} ──")
    prompt = render_row(chosen[:start], start, tokenizer, max_length)
    lines = [head, prompt]
    for label, ids in (("chosen", chosen), ("rejected", rejected)):
        answer = render_row(ids, start, tokenizer, max_length)
        marked = answer[answer.index("⟦"):] if "⟦" in answer else "(nothing left after max_length)"
        lines.append(f"▶ {label}: {marked.replace(chr(10) + '▶ ', chr(10) + '  ')}")
    return "\n".join(lines) + "\n"


def preview(cfg, n_rows: int) -> str:
    """The preview text of a composed RunConfig."""
    data = load_task_data(cfg.data)
    tokenizer = loaders.load_tokenizer(cfg.model, cfg.cache_dir)
    max_length = cfg.trainer.max_length
    report = quality_report.add_tokens(data.report, data, tokenizer, max_length)
    quality_report.warn(report)
    fmt = "the chat template" if cfg.data.format == "chat" else "raw text (prompt + completion + EOS)"
    out = [f"preview: model={cfg.model.name} data={cfg.data.name} ({data.layout} layout, {fmt}), "
           f"trainer.max_length={max_length}", LEGEND, ""]
    shown = min(n_rows, len(data.train))
    if data.kind == "preference":
        out[1] = PAIR_LEGEND
        out += [_pair(data.train[i], i, len(data.train), tokenizer, max_length) for i in range(shown)]
        shown = 0
    for i in range(shown):
        ids, start = quality_report.row_tokens(data.train[i], tokenizer)
        cut = " (cut at max_length)" if len(ids) > max_length else ""
        out.append(f"── train row {i + 1} of {len(data.train)}: {len(ids)} tokens{cut}, {start} context, "
                   f"{len(ids) - start} completion (trained) ──")
        out.append(render_row(ids, start, tokenizer, max_length))
        out.append("")
    out.append("data report")
    out.append(quality_report.render(report))
    return "\n".join(out)


def main(overrides: list[str]) -> str:
    """Compose the command line's overrides as a run would, check them, and return the preview text."""
    cfg = preflight.compose(list(overrides))
    rows = cfg.preview.rows
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise ConfigError(f"preview.rows must be an integer >= 0, got {rows!r}")
    validate(cfg)
    return preview(cfg, rows)
