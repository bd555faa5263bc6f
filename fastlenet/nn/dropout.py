"""Dropout: a drop-in for nn.Dropout whose noise comes from fastlenet's CPU kernel
(fastlenet/dropout.py): the same outputs and draws, bit for bit."""

from torch import nn

from fastlenet.dropout import dropout


class Dropout(nn.Dropout):
    """torch.nn.Dropout (same arguments, no state): in training on the CPU its noise is drawn
    by fastlenet's kernel, the same numbers from the same generator as stock's."""

    def forward(self, input):
        return dropout(input, self.p, self.training, self.inplace)
