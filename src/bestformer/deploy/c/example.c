/* Example driver: reads one input (BESTFORMER_INPUT_SIZE raw float32 values, native byte order) from
 * the file argv[1] (or stdin) and prints the logits, one per line, then the argmax.
 * Build: cc -std=c99 -O2 -ffp-contract=off model.c example.c -o predict */
#include <stdio.h>
#include <stdlib.h>
#include "model.h"

static double arena_storage[(BESTFORMER_ARENA_BYTES + sizeof(double) - 1) / sizeof(double)];

int main(int argc, char **argv) {
    static float input[BESTFORMER_INPUT_SIZE];
    float logits[BESTFORMER_NUM_CLASSES];
    FILE *fp = argc > 1 ? fopen(argv[1], "rb") : stdin;
    unsigned k, best = 0;
    int rc;
    if (fp == NULL || fread(input, sizeof(float), BESTFORMER_INPUT_SIZE, fp) != BESTFORMER_INPUT_SIZE) {
        fprintf(stderr, "cannot read %u float32 values\n", (unsigned)BESTFORMER_INPUT_SIZE);
        return 2;
    }
    rc = bestformer_predict(input, logits, arena_storage);
    if (rc != BESTFORMER_OK) {
        fprintf(stderr, "bestformer_predict failed: %d\n", rc);
        return 1;
    }
    for (k = 0; k < BESTFORMER_NUM_CLASSES; k++) {
        printf("%.9g\n", logits[k]);
        if (logits[k] > logits[best]) best = k;
    }
    printf("argmax %u\n", best);
    return 0;
}
