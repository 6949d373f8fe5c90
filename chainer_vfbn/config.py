"""Every default of the reproduction in one place, each with where it comes from.

"paper" is Miyato et al. 2017 (cited in the README), "cifar10" is the 2016 state of
mitmul/chainer-cifar10 that the paper's appendix points to, "choice" is ours, made
where both are silent and written down in SPEC.md and the README.
"""

# Network (paper appendix B.1, Figure 2; cifar10's ResNet-110).
UNITS_PER_BLOCK = 18          # paper: 3 blocks x 18 units x 2 convs + conv1 + fc = 110
BLOCK_CHANNELS = (32, 64, 64)  # paper B.1: feature maps of ResBlock-1, 2, 3
MAX_UNITS_PER_BLOCK = 200     # choice: --depth's bound, ResNet-1202, the deepest CIFAR-10
                              # network of He et al. 2016 (sec. 4.2); 6 x 200 + 2 layers
STEM_CHANNELS = 16            # paper B.1: 24x24x3 -> 22x22x16, no padding
N_CLASSES = 10                # CIFAR-10 / Fashion-MNIST
INPUT_SIZE = 24               # paper B.1: 24x24 crops

# Optimisation of the network (choice: cifar10's ResNet-110 recipe; SPEC section 4).
LR = 0.1                      # MomentumSGD learning rate
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
BATCHSIZE = 128
LR_DROP_EVERY = 5             # epochs of the 36x set between drops
LR_DROP_FACTOR = 0.1
EPOCHS = 12                   # paper: 12 epochs over the 1.8M-image set

# Synthesizers (SPEC section 3).
ALPHA_GS = 1e-3               # paper Table 1: Adam's alpha for the synthesizer
DELTA_RMS_DECAY = 0.99        # choice: running RMS of the true delta (scale s)

# Data (cifar10 2016; SPEC section 5).
N_VIEWS = 36                  # 9 crops 24x24 + 9 crops 28x28 resized, x2 flips
STANDARDIZE_EPS = 1e-5        # (v - mean_c) / (std_c + eps), per view

# Evaluation.
EVAL_VIEWS = 36               # paper B.1: average the outputs over the 36 views
