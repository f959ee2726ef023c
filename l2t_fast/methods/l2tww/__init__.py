"""L2T-ww (learned What and Where) and L2T-w (learned What only): the bilevel engine of
``l2t_fast.methods.l2tww.engine.L2TWW`` behind the common ``Method`` interface.

``meta`` holds the meta-networks, ``engine`` the real step and the exact meta step,
``batchnorm`` the fused BatchNorm double backward the lookahead runs on.
"""
from l2t_fast.jobs.options import Choice, Float, Int, Option
from l2t_fast.methods import register
from l2t_fast.methods.base import BACKEND, BETA, PAIRS, Method
from l2t_fast.methods.l2tww.engine import L2TWW
from l2t_fast.methods.l2tww.meta import WHERE_ACTIVATIONS

META_OPTIONS = (
    PAIRS, BETA, BACKEND,
    Option("inner_steps", 2, Int(1),
           "T: lookahead steps on the matching loss in the meta step"),
    Option("meta_lr", 1e-4, Float(0, above=True), "Adam learning rate of the What/Where "
           "networks"),
    Option("meta_weight_decay", 1e-4, Float(0), "Adam weight decay of the What/Where networks"),
    Option("meta_period", 1, Int(1), "a meta step every this many iterations"),
)
WHERE_OPTIONS = (
    Option("where_activation", "relu6", Choice(*WHERE_ACTIVATIONS),
           "activation of the Where network's pair weights"),
    Option("where_init", 1.0, Float(), "initial bias of the Where network (its first "
           "pre-activation)"),
)


class LearnedTransfer(Method):
    """The bilevel engine behind the common interface; ``learn_where`` tells the two apart."""

    learn_where = True

    def __init__(self, setup, **options):
        self.engine = L2TWW(setup.source_model, setup.target_model, setup.source_layers,
                            setup.target_layers, learn_where=self.learn_where,
                            example_input=setup.example_input, **options)
        self.model = self.engine.target_model
        self.optimizer = self.engine.optimizer

    def train_step(self, batch):
        return {name: float(value) for name, value in self.engine.step(batch.x, batch.y).items()}

    def state_dict(self):
        return self.engine.state_dict()

    def load_state_dict(self, state):
        self.engine.load_state_dict(state)

    def pair_weights(self, x):
        """Mean learned Where weight of each of ``self.engine.pairs`` on ``x``."""
        return self.engine.pair_weights(x)


@register("l2t-w", order=50, summary="L2T-w: feature matching with learned channel weights "
          "(What), every pair weighing 1", options=META_OPTIONS)
class LearnWhat(LearnedTransfer):
    learn_where = False


@register("l2t-ww", order=60, summary="L2T-ww: feature matching with learned channel (What) "
          "and pair (Where) weights", options=META_OPTIONS + WHERE_OPTIONS)
class LearnWhatAndWhere(LearnedTransfer):
    def outputs(self, probe):
        return {"where_weights": {"pairs": [list(p) for p in self.engine.pairs],
                                  "values": self.pair_weights(probe).tolist()}}

    @classmethod
    def combine_outputs(cls, outputs, source_layers, target_layers):
        """The mean learned Where weight per (source layer, target layer) over the runs;
        None where no pair was chosen."""
        runs = [output["where_weights"] for output in outputs]
        matrix = [[None] * len(target_layers) for _ in source_layers]
        for m, n in runs[0]["pairs"]:
            matrix[m][n] = 0.0
        for run in runs:
            for (m, n), value in zip(run["pairs"], run["values"]):
                matrix[m][n] += value / len(runs)
        return {"where_weights": {"kind": "heatmap", "rows": list(source_layers),
                                  "columns": list(target_layers), "matrix": matrix,
                                  "row_label": "source layer", "column_label": "target layer",
                                  "title": "L2T-ww: mean learned where-weight"}}
