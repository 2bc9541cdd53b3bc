# The GPU session's benchmark shapes, sourced by session.sh (which runs them) and kit.sh (which makes their
# synthetic rows ahead, on the dev machine, so the lease is not spent on them). GPUKIT_* overrides win; rows for
# other steps or peers are then made on the device.
SMALL_STEPS=${GPUKIT_SMALL_STEPS:-20} SMALL_WARMUP=${GPUKIT_SMALL_WARMUP:-3} SMALL_REPEATS=${GPUKIT_SMALL_REPEATS:-1}
B8_STEPS=${GPUKIT_8B_STEPS:-8} B8_WARMUP=${GPUKIT_8B_WARMUP:-2} B8_REPEATS=${GPUKIT_8B_REPEATS:-1}
SMALL_PEERS=${GPUKIT_SMALL_PEERS:-trl,trl-packed,chatft-packed,trl-padding-free}
B8_PEERS=${GPUKIT_8B_PEERS:-trl,chatft-packed} B8_CHECKPOINTING=${GPUKIT_8B_CHECKPOINTING:-off}
PROFILE_STEPS=${GPUKIT_PROFILE_STEPS:-4} PROFILE_PEERS=chatft-packed  # chatft's default and packed layouts, profiled
