"""The precision conventions every printed size and NS-ACE shares (docs/analysis.md, "whose convention").

- :data:`FULL_PRECISION` (32): what a plain float layer is (``weight_bits_of`` of ``nn.Linear``/``nn.Conv2d``).
- :data:`FP_BITS` (16): what the papers charge a *full-precision* weight. BESTformer's Table 2 stores the
  full-precision Spikformer-8-512 (29.68 M parameters) in 59.36 MB, i.e. 16 bits per parameter, and Table 3 charges
  its NS-ACE as 16 x SOPs; QSD-Transformer's tables do the same for their full-precision rows. ``--fp-bits``
  changes it for both size and NS-ACE.
- :data:`MIXED_FP_BITS` (32): the full-precision parts of a quantized model (BESTformer's first convolution and
  head, every bias). Table 2's 1.18 MB (10 classes) and 1.31 MB (100 classes) for BESTformer-4-384 need them at
  32 bits (16 would give 1.17 and 1.24 MB).
"""

from __future__ import annotations

from ..errors import ConfigError

FULL_PRECISION = 32
FP_BITS = 16
MIXED_FP_BITS = 32


def check_fp_bits(fp_bits: object) -> int:
    """``fp_bits`` must be an integer in [1, 64]."""
    if not isinstance(fp_bits, int) or isinstance(fp_bits, bool) or not 1 <= fp_bits <= 64:
        raise ConfigError(f"fp_bits must be an integer in [1, 64], got {fp_bits!r}")
    return fp_bits
