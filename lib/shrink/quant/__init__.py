"""shrink.quant — the bits chapter: one fake-quantizer, W8A8 wrapping, SmoothQuant, CushionCache.

- :mod:`~shrink.quant.quantizer`   :class:`QuantSpec`, :func:`fake_quant` (sym/asym; tensor/token/column/group)
- :mod:`~shrink.quant.fakequant`   :func:`wrap_model`, :func:`calibrate` (static, prefix excluded, clipping)
- :mod:`~shrink.quant.smoothquant` :func:`act_scales`, :func:`smooth_model`
- :mod:`~shrink.quant.cushioncache` :func:`greedy_search` (Alg. 1), :func:`tune_prefix` (stage 2)
- :mod:`~shrink.quant.diagnostics` residual / linear-input stats, attention mass, kurtosis, Table 5
- :mod:`~shrink.quant.flexround`   FlexRound learned rounding (block reconstruction on :mod:`shrink.reconstruction`)
- :mod:`~shrink.quant.rsq`         RSQ: token-weighted GPTQ Hessian, QuaRot-style rotation folded into the weights
- :mod:`~shrink.quant.presets`     quantizer conventions and the ``bits`` experiment presets

Introduced in: notebooks/02-bits/02a-quantizer-primer.md
"""

from .quantizer import (QuantError, QuantSpec, WeightGrid, fake_quant, fake_quant_kernel, qparams,  # noqa: F401
                        quant_error, range_of)
from .fakequant import (QuantLinear, calibrate, decoder_linears, largest_static_range, quant_linears,  # noqa: F401
                        perturb_ranges, quantized, set_ranges, static_ranges, unwrap_model, wrap_model)
from .smoothquant import act_scales, smooth_model  # noqa: F401
from .gptq import WeightQuantSpec, gptq_quantize, quantize_model, rtn_quantize  # noqa: F401
from .cushioncache import (LQ_SPEC, LqRecorder, SearchResult, candidate_lq, greedy_search,  # noqa: F401
                           prefixquant_tokens, prerank_vocab, search_throughput, shortlist, text_lq, tune_prefix)
from . import diagnostics, presets  # noqa: F401
from .presets import cushioncache_paper, qllm_eval, smoothquant_code, smoothquant_level  # noqa: F401
