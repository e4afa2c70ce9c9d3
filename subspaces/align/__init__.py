"""Permutation alignment of two networks: weight matching (Ainsworth et al. 2022, "Git Re-Basin").

Hidden channels can be reordered without changing a network's function, as long as every tensor
that reads or writes a channel is reordered the same way. The package, one concept per module:

- :mod:`.spec` — :func:`permutation_spec`: the groups of coupled tensor axes (a
  :class:`PermutationSpec`, :mod:`.groups`), found by tracing the model with ``torch.fx``
  (:mod:`.trace`) and propagating a channel label per tensor axis (:mod:`.spaces`) through the
  graph (:mod:`.propagate`) by the rule of each operation (:mod:`.rules`);
- :mod:`.permute` — :func:`random_permutation`, :func:`apply_permutation`;
- :mod:`.check` — :func:`check_spec`: a random permutation of every group must leave the outputs
  unchanged, also on a :func:`perturbed_copy`;
- :mod:`.matching` — :func:`weight_matching`: the permutations maximising sum_p <W_A^p, P W_B^p>;
- :mod:`.pair` — :func:`align`: B permuted to match A and checked; :func:`parameter_distance`,
  :func:`example_batch`.
"""

from __future__ import annotations

from .check import check_spec, perturbed_copy
from .groups import PermutationSpec
from .matching import weight_matching
from .pair import align, example_batch, parameter_distance
from .permute import apply_permutation, random_permutation
from .spec import permutation_spec

__all__ = ["PermutationSpec", "align", "apply_permutation", "check_spec", "parameter_distance", "permutation_spec", "perturbed_copy",
           "random_permutation", "weight_matching", "example_batch"]
