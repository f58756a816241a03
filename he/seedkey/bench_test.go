package seedkey_test

import (
	"bytes"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring/ringqp"

	"github.com/kmsd-project/kmsd/he"
	"github.com/kmsd-project/kmsd/he/seedkey"
)

// BenchmarkGaloisKey: one Galois key of each CKKS preset, from the bytes a
// client holds after the download: expanded from its seeded form
// (Expand) vs decoded from its full form (Lattigo's UnmarshalBinary), and
// the sizes of both. Run with -bench GaloisKey -benchtime 5x.
func BenchmarkGaloisKey(b *testing.B) {
	for _, preset := range []string{"ckks-logn13", "ckks-logn14", "ckks-logn15", "ckks-logn16"} {
		p, err := he.Resolve(he.CKKS, []byte(`"`+preset+`"`))
		if err != nil {
			b.Fatal(err)
		}
		params := p.RLWE()
		seed := &[32]byte{7}
		gk := rlwe.NewGaloisKey(params)
		gk.GaloisElement, gk.NthRoot = params.GaloisElement(1), params.RingQ().NthRoot()
		var as []ringqp.Poly
		for _, e := range seedkey.GadgetEntries(&gk.GadgetCiphertext) {
			as = append(as, *e[1])
		}
		if err := seedkey.ExpandA(params, seed, gk.LevelQ(), gk.LevelP(), as); err != nil {
			b.Fatal(err)
		}
		full, _ := gk.MarshalBinary()
		var sb bytes.Buffer
		if err := seedkey.Encode(&sb, gk, seed); err != nil {
			b.Fatal(err)
		}
		seeded := sb.Bytes()
		b.Run(preset+"/expand-seeded", func(b *testing.B) {
			b.SetBytes(int64(len(seeded)))
			for b.Loop() {
				if _, err := seedkey.Expand(params, seedkey.Galois, seeded); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(seeded))/(1<<20), "MiB-seeded")
		})
		b.Run(preset+"/decode-full", func(b *testing.B) {
			b.SetBytes(int64(len(full)))
			for b.Loop() {
				k := rlwe.NewGaloisKey(params)
				if err := k.UnmarshalBinary(full); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(full))/(1<<20), "MiB-full")
		})
	}
}
