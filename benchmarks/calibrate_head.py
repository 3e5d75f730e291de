"""How ``--quantize int8`` picks the exponent that scales the output projection's input channels.

The output projection's input is the final norm's output, whose channel ``j`` is multiplied by the norm's gain
``g_j`` (0.19 to 301 on Gemma 3 270M). Quantizing ``W * g ** a`` per row and dividing the input by ``g ** a``
computes the same product in float, but moves the int8 rounding error away from the channels that carry the most
signal (AWQ's idea). For each exponent ``a`` this prints the KL divergence of the next-token distributions from
float32's over every position of a calibration text (English and Chinese, not the texts the generation benchmark
scores), with the weights rounded as ``quantize_weight`` rounds them and exact activations:

    python benchmarks/calibrate_head.py

Measured here (quantize.HEAD_GAIN_EXPONENT is the best of these):

    exponent  mean KL   max KL   same top token
    0.0       0.00745   0.0870   95.0%
    0.2       0.00328   0.0148   96.7%
    0.4       0.00476   0.0161   93.3%
"""

from __future__ import annotations

import argparse

CALIBRATION = [
    "Rivers shape the land they cross. Over thousands of years water cuts valleys, carries sand to the sea and "
    "builds wide deltas where farmers grow rice and wheat. Cities grew beside rivers because boats moved goods "
    "cheaply, and bridges, mills and harbours followed.",
    "河流塑造了它们流经的土地。千百年来，流水切开山谷，把泥沙带到海边，堆积成宽阔的三角洲，农民在那里种植水稻和小麦。"
    "城市沿河而建，因为船只运货便宜，桥梁、磨坊和港口也随之出现。",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exponents", default="0,0.1,0.2,0.3,0.4,0.5,0.6")
    args = parser.parse_args()

    import torch

    from llmsample.models import load
    from llmsample.quantize import head_channel_scale, quantize_weight

    lm = load(device="cpu")
    model = lm.model
    hidden = []
    captured: dict = {}
    hook = model.model.norm.register_forward_hook(lambda module, inputs, output: captured.update(h=output))
    with torch.inference_mode():
        for text in CALIBRATION:
            model(input_ids=lm.tokenizer(text, return_tensors="pt").input_ids, logits_to_keep=0)
            hidden.append(captured["h"][0, 1:])  # the BOS position predicts nothing of the text
        hook.remove()
        states = torch.cat(hidden)
        weight = model.get_input_embeddings().weight.detach()
        reference = torch.log_softmax(states @ weight.t(), -1)
        gain = head_channel_scale(model, 1.0)
        print(f"{states.shape[0]} positions; norm gains {gain.min():.3g} to {gain.max():.3g}")
        print("exponent  mean KL   max KL   same top token")
        for exponent in (float(a) for a in args.exponents.split(",")):
            scale = head_channel_scale(model, exponent)
            int8, scales = quantize_weight(weight * scale)
            logprobs = torch.log_softmax(states @ ((int8.float() * scales[:, None]) / scale).t(), -1)
            kl = (reference.exp() * (reference - logprobs)).sum(-1)
            same = (logprobs.argmax(-1) == reference.argmax(-1)).float().mean()
            print(f"{exponent:<9} {kl.mean():.5f}   {kl.max():.4f}   {same:.1%}")


if __name__ == "__main__":
    main()
