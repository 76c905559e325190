"""Memory of an HF export from a checkpoint: streamed one tensor at a time (model_utils.export_hf_from_checkpoint)
vs building the model and exporting it (load_model + export_hf). Each path runs in a fresh process; the figure is
the peak anonymous resident memory (RssAnon, sampled every 5 ms) above the level after the imports, so the
checkpoint's memory-mapped file pages do not count. Linux only.

    python -m bench.export_memory [--preset 125m]

Writes bench/results/export_memory_<preset>.json (bench/results_file.py's form) too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, threading, time
import model_utils

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

peak, done = [0.0], [False]

def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.005)

step, out, how = sys.argv[1], sys.argv[2], sys.argv[3]
base = anon()
t = threading.Thread(target=sample)
t.start()
if how == "streamed":
    model_utils.export_hf_from_checkpoint(step, out)
else:
    model, args = model_utils.load_model(step)
    model_utils.export_hf(model, args, out)
done[0] = True
t.join()
print(json.dumps({"peak_mib": peak[0] - base}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="125m")
    a = ap.parse_args()
    import torch

    import checkpoint as ckpt
    import config
    from model import Transformer

    cfg = config.load_config(overrides={"MODEL_PRESET": a.preset, "TOKENIZER_CHECKPOINT_PATH": str(ROOT / "tokenizer.model")})
    model = Transformer(cfg.model_args(8448))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save(Path(tmp) / "ck", 1, model, None, trainer_state={"step": 1},
                  config={"model_args": model.args.to_dict(), "settings": cfg.to_dict()})
        del model
        step = Path(tmp) / "ck" / ckpt.step_name(1)
        rows = {}
        for how in ("streamed", "load_model + export_hf"):
            p = subprocess.run([sys.executable, "-c", _CHILD, str(step), str(Path(tmp) / how.split()[0]), how],
                               cwd=ROOT, capture_output=True, text=True, check=True)  # cwd: -c imports from it
            rows[how] = json.loads(p.stdout.strip().splitlines()[-1])["peak_mib"]
    print(f"preset {a.preset}: {sum(sizes) / 2**20:.0f} MiB of fp32 weights, largest tensor {max(sizes) / 2**20:.0f} MiB")
    for how, mib in rows.items():
        print(f"  {how:<24} peak memory above the imports: {mib:.0f} MiB")
    from bench import results_file

    print(results_file.write(f"export_memory_{a.preset}", f"python -m bench.export_memory --preset {a.preset}",
                             {"preset": a.preset, "weights_mib": sum(sizes) / 2**20,
                              "largest_tensor_mib": max(sizes) / 2**20, "peak_mib_streamed": rows["streamed"],
                              "peak_mib_load_model": rows["load_model + export_hf"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
