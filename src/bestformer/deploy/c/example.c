/* Example driver: reads inputs (BESTFORMER_INPUT_SIZE raw float32 values each, native byte order, one after the
 * other) from the file argv[1] (or stdin) and prints, for each, one line: its logits, then "argmax" and the class.
 * Build: cc -std=c99 -O2 -ffp-contract=off model.c example.c -o predict */
#include <stdio.h>
#include <stdlib.h>
#include "model.h"

int main(int argc, char **argv) {
    static float input[BESTFORMER_INPUT_SIZE];
    float logits[BESTFORMER_NUM_CLASSES];
    FILE *fp = argc > 1 ? fopen(argv[1], "rb") : stdin;
    /* allocated memory: the library stores floats, words and ints into it (a declared array of another type
     * would break C's aliasing rules under link-time optimization) */
    void *arena = malloc(BESTFORMER_ARENA_BYTES);
    unsigned long samples = 0;
    size_t got;
    int status = 0;
    if (fp == NULL || arena == NULL) {
        fprintf(stderr, fp == NULL ? "cannot open the input file\n" : "out of memory\n");
        free(arena);
        if (fp != NULL && fp != stdin) fclose(fp);
        return 2;
    }
    while ((got = fread(input, sizeof(float), BESTFORMER_INPUT_SIZE, fp)) == BESTFORMER_INPUT_SIZE) {
        unsigned k, best = 0;
        int rc = bestformer_predict(input, BESTFORMER_INPUT_SIZE, logits, BESTFORMER_NUM_CLASSES, arena,
                                    BESTFORMER_ARENA_BYTES);
        if (rc != BESTFORMER_OK) {
            fprintf(stderr, "bestformer_predict failed on input %lu: %d\n", samples, rc);
            status = 1;
            break;
        }
        for (k = 0; k < BESTFORMER_NUM_CLASSES; k++) {
            printf("%.9g ", logits[k]); /* 9 significant digits: the float32 value exactly */
            if (logits[k] > logits[best]) best = k;
        }
        printf("argmax %u\n", best);
        samples++;
    }
    free(arena);
    if (fp != stdin) fclose(fp);
    if (status == 0 && (got != 0 || samples == 0)) {
        fprintf(stderr, "expected a whole number (at least 1) of inputs of %u float32 values\n",
                (unsigned)BESTFORMER_INPUT_SIZE);
        status = 2;
    }
    return status;
}
