"""A new figure in one file (a plug-in; tests/test_plugins.py draws it with ``harness figures``).

``final_by_seed``: every cell's final score against its seed, one marker colour per loss and a
panel per init: the seeds' spread at a glance.
"""
import matplotlib.pyplot as plt

from analysis.figures import register_figure
from analysis.style import save


@register_figure("final_by_seed")
def final_by_seed(study, out_dir, rng, timer):
    with timer("final_by_seed"):
        inits = list(study.init_order)
        fig, axes = plt.subplots(1, len(inits), figsize=(2.4 * len(inits), 2.4), sharey=True,
                                 squeeze=False)
        for ax, init in zip(axes[0], inits):
            for loss in study.loss_order:
                d = study.final[(study.final["init"] == init) & (study.final["loss"] == loss)]
                ax.plot(d["seed"], d["value"], "o", label=loss)
            ax.set_title(init, fontsize=8)
            ax.set_xlabel("seed")
            ax.set_xticks(sorted(study.final["seed"].unique()))
        axes[0][0].set_ylabel(study.metric)
        axes[0][-1].legend(fontsize=7)
        return save(fig, out_dir, "final_by_seed")
