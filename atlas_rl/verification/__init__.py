"""Verification: lossless rejection sampling of drafts against the target.

* ``processed_logprobs`` / ``processed_probs``: temperature, top-k, top-p, applied identically to target and drafts;
* ``reference_verify``: one sequence, plain loops, the test oracle;
* ``RejectionSampler``: the batched ``Verifier`` (ragged drafts, CPU or CUDA), with ``draw_uniforms``.
"""

from atlas_rl.verification.base import Verifier
from atlas_rl.verification.processing import processed_logprobs, processed_probs, sample_inverse_cdf
from atlas_rl.verification.reference import reference_verify
from atlas_rl.verification.rejection import PAD_ID, RejectionSampler, draw_uniforms

__all__ = [
    "PAD_ID",
    "RejectionSampler",
    "Verifier",
    "draw_uniforms",
    "processed_logprobs",
    "processed_probs",
    "reference_verify",
    "sample_inverse_cdf",
]
