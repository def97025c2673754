// Compile-time checks of the shared format constants (docs/FORMAT.md).
#include "unweight/format.h"

static_assert(unweight::kLanes * unweight::kDefaultChunkSteps % unweight::kGroup == 0,
              "a chunk must hold whole escape groups of a row-aligned tensor");
static_assert((1 << unweight::kMaxCodeLen) <= 65536, "decoder table entries are 16-bit indexed");
static_assert(unweight::kMaxCodeLen < unweight::kWordBits, "one word refill must cover any code");
