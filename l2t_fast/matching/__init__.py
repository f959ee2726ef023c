"""The weighted feature-matching op (docs/SPEC.md section 1): the functional API and module
(``loss``), the input checks every call passes first (``inputs``), and the backends that
compute it (``backends``: the float64-checked reference, the C++/CUDA extension, Triton)."""
from l2t_fast.matching.backends import available_backends
from l2t_fast.matching.loss import (WeightedFeatureMatching, weighted_feature_matching,
                                    weighted_feature_matching_grads,
                                    weighted_feature_matching_jvp)

__all__ = ["WeightedFeatureMatching", "available_backends", "weighted_feature_matching",
           "weighted_feature_matching_grads", "weighted_feature_matching_jvp"]
