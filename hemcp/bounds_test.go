package hemcp

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/he"
)

// countValues counts a decoded JSON value's values as shapeOf does.
func countValues(v any) int {
	n := 1
	switch v := v.(type) {
	case []any:
		for _, e := range v {
			n += countValues(e)
		}
	case map[string]any:
		for _, e := range v {
			n += countValues(e)
		}
	}
	return n
}

// TestShapeOf: the count that decides a refusal before the SDK decodes a
// call's arguments matches the decoded arguments, whatever the strings
// and member names hold (brackets, quotes, escapes, an escaped name of a
// counted member).
func TestShapeOf(t *testing.T) {
	for _, c := range []struct {
		args                 string
		items, leaves, width int
	}{
		{`{"weights":[[1,2,3],[4,5]],"bias":[1,2]}`, 2, 5, 3},
		{`{ "x" : "],[\"weights\":[[" , "weights" : [ [ 1 , -2.5e3 ] , [ ] , [true,null,"a]"] ] }`, 3, 5, 3},
		{`{"w\u0065ights":[[1,2],[3]],"ciphertext":{"weights":[[9,9,9,9]],"s":"\\"}}`, 2, 3, 2},
		{`{"weights":[[1],[2]],"weights":[[3,4,5]]}`, 3, 5, 3}, // repeated: summed (decoding keeps the last)
		{`{"weights":{"a":[[1]]},"bias":[]}`, 0, 0, 0},
		{`{}`, 0, 0, 0},
	} {
		sh := shapeOf([]byte(c.args), "weights")
		var v any
		if err := json.Unmarshal([]byte(c.args), &v); err != nil {
			t.Fatal(err)
		}
		if strings.Count(c.args, `"weights":[`) > 1 {
			v = nil // decoding drops a repeated member: the counts are above it
		}
		if sh.items[0] != c.items || sh.leaves[0] != c.leaves || sh.widest[0] != c.width || v != nil && sh.values != countValues(v) {
			t.Errorf("%s: %+v, want %d items, %d leaves, widest %d, %d values", c.args, sh, c.items, c.leaves, c.width, countValues(v))
		}
	}
	// Random nested values: the count of values matches.
	rng := rand.New(rand.NewPCG(1, 2))
	var gen func(depth int) any
	gen = func(depth int) any {
		switch k := rng.IntN(6); {
		case k == 0 && depth < 5:
			a := make([]any, rng.IntN(4))
			for i := range a {
				a[i] = gen(depth + 1)
			}
			return a
		case k == 1 && depth < 5:
			m := map[string]any{}
			for i := range rng.IntN(4) {
				m[fmt.Sprintf("k%d\"]{%d", i, rng.IntN(9))] = gen(depth + 1)
			}
			return m
		case k == 2:
			return `s"\]}[{,:` + fmt.Sprint(rng.IntN(100))
		case k == 3:
			return rng.NormFloat64()
		default:
			return []any{true, nil, false}[rng.IntN(3)]
		}
	}
	for range 500 {
		v := map[string]any{"a": gen(0), "b": gen(0)}
		b, _ := json.MarshalIndent(v, "", " ")
		if got, want := shapeOf(b).values, countValues(v); got != want {
			t.Fatalf("%s: %d values, want %d", b, got, want)
		}
	}
}

// BenchmarkDiagonalEncoding: encoding one diagonal of a matrix (a
// plaintext of every slot at the top level), with the precision Lattigo
// picks for the preset (55 bits from ckks-logn14 up, whose scale is 2^55:
// big floats) and with 53 (float64). MatVec encodes one per column,
// rounded up to a power of two; it is most of he_linear's time from
// ckks-logn14 up (BENCHMARKS.md).
func BenchmarkDiagonalEncoding(b *testing.B) {
	for _, preset := range []string{"ckks-logn13", "ckks-logn14", "ckks-logn15"} {
		p, err := he.Resolve(he.CKKS, json.RawMessage(`"`+preset+`"`))
		if err != nil {
			b.Fatal(err)
		}
		params := p.CKKS
		v := make([]float64, params.MaxSlots())
		for i := range v {
			v[i] = float64(i%7) / 7
		}
		pt := ckks.NewPlaintext(params, params.MaxLevel())
		for _, prec := range slices.Compact([]uint{params.EncodingPrecision(), 53}) {
			b.Run(fmt.Sprintf("%s/precision-%d", preset, prec), func(b *testing.B) {
				enc := ckks.NewEncoder(params, prec)
				for b.Loop() {
					if err := enc.Encode(v, pt); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
