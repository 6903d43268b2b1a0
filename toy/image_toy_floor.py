"""The FD-proxy's noise floor for the image toy: the Frechet distance, in the same classifier's features, between the
run's reference set of real digits and other, disjoint sets of real digits of the same size. Nothing generated can be
told apart from real data below this number.

    python toy/image_toy_floor.py [--seed N]     # writes fd_floor.json beside that seed's --full run
"""

import argparse
import json
from pathlib import Path

import torch

from toy.image_toy import frechet, full_out, load_digits16, train_classifier


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--classifier-iters", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: fd_floor.json in the seed's --full folder")
    a = p.parse_args(argv)
    out = a.out or full_out(a.seed) / "fd_floor.json"
    torch.set_num_threads(2)
    x, y, n_classes = load_digits16()
    clf, _ = train_classifier(x, y, n_classes, a.classifier_iters, a.seed)     # as image_toy.main
    g = torch.Generator().manual_seed(1000 + a.seed)                            # the same draws as image_toy.main
    torch.randn((a.n_eval, *x.shape[1:]), generator=g)
    perm = torch.randperm(len(x), generator=g)
    with torch.no_grad():
        ref = clf.body(x[perm[: a.n_eval]])
        floors = [frechet(clf.body(x[perm[i:i + a.n_eval]]), ref) for i in range(a.n_eval, len(x) - a.n_eval + 1, a.n_eval)]
    res = {"n_eval": a.n_eval, "fd_proxy_real_vs_real": floors,
           "command": "python toy/image_toy_floor.py" + (f" --seed {a.seed}" if a.seed else "")}
    out.write_text(json.dumps(res, indent=1))
    print(res)


if __name__ == "__main__":
    main()
