# Sourced by the device benchmarks: the order of the targets in each round.
# Round r starts at the r-th target of $TARGETS when ROTATE is 1 (BENCH_ROTATE, default 1): a
# target's place in a round changed its write figures by up to 1.8x (the first fvd target after
# loop or qcow2 ran slower), and interleaving rounds alone does not cancel that. ROTATE=0 keeps
# the given order in every round.
ROTATE=${BENCH_ROTATE:-1}
round_targets() { # round (1-based) -> the targets, space-separated
  local -a t=($TARGETS)
  local k=0 i
  [ "$ROTATE" = 1 ] && k=$(( ($1 - 1) % ${#t[@]} ))
  for ((i = 0; i < ${#t[@]}; i++)); do echo -n "${t[(i + k) % ${#t[@]}]} "; done
}
