"""Quantization: pure quantizer functions, estimators, the NNX quantizer module, quantized layers,
per-layer rules and calibration. See each module's docstring for the math and the papers."""

from mpq.quant.calibration import calibrate
from mpq.quant.core import dequantize, fake_quant, quantize, qrange
from mpq.quant.layers import LayerQuant, QuantLayers, QuantOptions
from mpq.quant.quantizer import ESTIMATORS, QParam, QState, Quantizer, set_bits
from mpq.quant.rules import resolve
