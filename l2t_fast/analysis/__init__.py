"""What was transferred: measurements that compare networks and the data they see
(Neyshabur, Sedghi and Zhang, "What is being transferred in transfer learning?", NeurIPS
2020), behind ``l2t-fast analyze``.

- ``cka``: feature similarity (linear CKA, debiased CKA, all-pairs minibatch CKA).
"""
from l2t_fast.analysis.cka import MinibatchCKA, cka, cka_matrix, cka_over_loader

__all__ = ["MinibatchCKA", "cka", "cka_matrix", "cka_over_loader"]
