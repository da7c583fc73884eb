"""Usage: python benchmarks/recompute_roundtrip_alignment.py ASSETS_DIR

Recompute alignment_vae_roundtrip of a v4 build's provenance with the fixed acceptance code (the build measured the
round trip of an independent record set against these prompts: a mismatched pair, 0.22)."""
import json
import sys
from pathlib import Path

from diffusers import DiffusionPipeline

from tlcm.toy import common, teacher_path
from tlcm.toy.acceptance import _records
from tlcm.toy.autoencoder import reconstruct
from tlcm.toy.build import report_markdown
from tlcm.toy.metrics import ToyMetrics

assets = Path(sys.argv[1])
prov = json.loads((assets / "PROVENANCE.json").read_text())
ev, cfg = prov["evaluation"], prov["config"]
pipe = DiffusionPipeline.from_pretrained(str(teacher_path(assets / "teacher")))
metrics = ToyMetrics.load(assets / "metrics")
for key, split in (("heldin", "train"), ("heldout", "heldout")):
    prompts, real_a = _records(ev[key]["prompts"], cfg["seed"] + 500, split)
    old = ev[key]["alignment_vae_roundtrip"]
    ev[key]["alignment_vae_roundtrip"] = round(metrics.alignment(reconstruct(pipe.vae, real_a), prompts), 4)
    print(key, old, "->", ev[key]["alignment_vae_roundtrip"])
ev["corrections"] = [("alignment_vae_roundtrip recomputed by `python " + " ".join(sys.argv) + "` after fixing "
                      "tlcm.toy.acceptance (the build scored the round trip of an independent record set against "
                      "these prompts)")]
common.write_json(assets / "PROVENANCE.json", prov)
common.atomic_write_text(assets / "PROVENANCE.md", report_markdown(prov))
print("ok")
