"""Co-localisation boxes over training (like the paper's Fig. 4): a few images of a run, at each saved step.

    python -m experiments.coloc_figure --workdir workdirs/coloc/coloc_set_coloc_st_attention_t_8_s0_b100_n300 \\
        --out docs/images/coloc_steps_t_8.png

Reads the run's recorded ``config.json`` (run it from the directory the run was
started in: data and encoder paths in it may be relative), draws its first
``--images`` images (rows) at step 0 (the initial parameters, rebuilt from the
config's seed) and at every checkpoint in the workdir (columns), with the true
digit box in green and the transformer's box (its crop, read from the attention
parameters) in red, on a grey margin where crops reach past the image. Each
column's title gives the step and the fraction of the run's images localised
there (IoU > 0.5).
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from experiments.cli import run

flags.DEFINE_string("workdir", None, "A co-localisation run's directory (configs/colocalisation.py).")
flags.DEFINE_string("out", None, "The PNG to write.")
flags.DEFINE_integer("images", 4, "How many of the run's images to draw.")
flags.mark_flags_as_required(["workdir", "out"])
FLAGS = flags.FLAGS


def main(argv) -> None:
    del argv
    import jax
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from stn_jax.paper.checkpoints import checkpoint_manager, restore_step
    from stn_jax.paper.coloc import iou, theta_to_box
    from stn_jax.paper.config import resolve
    from stn_jax.paper.evaluation import open_run
    from stn_jax.paper.workdir import read_config

    workdir = Path(FLAGS.workdir).expanduser().absolute()
    config = resolve(read_config(workdir))
    if config.objective.name != "triplet":
        raise ValueError(f"{workdir} is a {config.objective.name} run, not a co-localisation (triplet) run")
    run_ = open_run(config, workdir)
    dataset = run_.setup.dataset
    n = min(int(FLAGS.images), dataset.test_size)
    everything = dataset.test_examples(np.arange(dataset.test_size))
    manager = checkpoint_manager(workdir, config.keep_checkpoints, create=False)
    states = [(0, jax.device_put(run_.setup.state, run_.replicated))]
    states += [(s, restore_step(run_, manager, s, run_.setup.state)) for s in sorted(manager.all_steps())]

    images, boxes = everything["image"], np.asarray(everything["box"])
    size = images.shape[1]
    fig, axes = plt.subplots(n, len(states), figsize=(1.6 * len(states), 1.6 * n + 0.3), squeeze=False)
    for col, (step, state) in enumerate(states):
        thetas, _ = jax.device_get(run_.picture_step(state.params, state.model_state, images))
        predicted = np.asarray(theta_to_box(np.asarray(thetas[0])))
        localised = float(np.mean(np.asarray(iou(predicted, boxes)) > config.objective.iou_threshold))
        axes[0, col].set_title(f"step {step}\n{localised:.0%} localised", fontsize=8)
        for row in range(n):
            ax = axes[row, col]
            ax.imshow(images[row, ..., 0], cmap="gray", vmin=0, vmax=1, extent=(0, size, size, 0))
            for box, colour in ((boxes[row], "lime"), (predicted[row], "red")):
                x0, y0, x1, y1 = (np.asarray(box) + 1) / 2 * size  # normalised [-1, 1] -> pixels
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1))
            margin = 0.45 * size  # crops may reach past the image (up to 1.43 image sides with the default bounds)
            ax.set_xlim(-margin, size + margin)
            ax.set_ylim(size + margin, -margin)
            ax.set_facecolor("lightgrey")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out = Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out} (steps {[s for s, _ in states]})")


if __name__ == "__main__":
    run(main)
