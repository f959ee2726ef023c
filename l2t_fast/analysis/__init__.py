"""What was transferred: measurements that compare networks and the data they see
(Neyshabur, Sedghi and Zhang, "What is being transferred in transfer learning?", NeurIPS
2020), behind ``l2t-fast analyze``.

- ``cka``: feature similarity (linear CKA, debiased CKA, all-pairs minibatch CKA).
- ``basins``: parameter distances, loss along straight lines between networks (barriers),
  module criticality.
- ``reuse``: block-shuffled images, common mistakes, the proxy A-distance of two domains.
"""
from l2t_fast.analysis.basins import (barrier, interpolation, loss_and_accuracy,
                                      module_criticality, parameter_distance)
from l2t_fast.analysis.cka import MinibatchCKA, cka, cka_matrix, cka_over_loader
from l2t_fast.analysis.reuse import block_shuffle, domain_distance, mistake_overlap

__all__ = ["MinibatchCKA", "barrier", "block_shuffle", "cka", "cka_matrix", "cka_over_loader",
           "domain_distance", "interpolation", "loss_and_accuracy", "mistake_overlap",
           "module_criticality", "parameter_distance"]
