package he

import (
	"context"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
)

func powersOfTwo(slots int) []int {
	var r []int
	for k := 1; k < slots; k *= 2 {
		r = append(r, k)
	}
	return r
}

// BenchmarkKeyset compares one keyset (public, relinearization and Galois
// keys for all power-of-two rotations) made by Generate on all cores and
// streamed to the blob store, with plain single-threaded Lattigo making the
// same keys in memory. Run with -bench Keyset -benchtime 3x.
//
// Both sides use Lattigo's NTT and error sampler; Generate draws the
// uniform halves of the keys from a per-key seed with AES-256-CTR
// (seeded.go) where Lattigo's key generator reads crypto/rand (v6.2.0),
// so part of the ratio is that change and part the second core.
func BenchmarkKeyset(b *testing.B) {
	for _, name := range []string{"ckks-logn14", "ckks-logn15"} {
		p, err := Resolve(CKKS, []byte(`"`+name+`"`))
		if err != nil {
			b.Fatal(err)
		}
		sk, _ := SecretKey(p.RLWE(), make([]byte, SeedSize))
		spec := KeySpec{Rotations: powersOfTwo(p.CKKS.MaxSlots()), Relinearization: true}
		gal, err := GaloisElements(p, spec)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(name+"/lattigo-single-thread", func(b *testing.B) {
			for b.Loop() {
				kgen := rlwe.NewKeyGenerator(p.RLWE())
				kgen.GenPublicKeyNew(sk)
				kgen.GenRelinearizationKeyNew(sk)
				for _, g := range gal {
					kgen.GenGaloisKeyNew(g, sk)
				}
			}
		})
		for _, workers := range []int{1, 0} {
			label := "generate-all-cores-to-blobs"
			if workers == 1 {
				label = "generate-one-worker-to-blobs" // the PRNG change alone
			}
			benchGenerate(b, name+"/"+label, p, sk, spec, gal, workers, false)
			benchGenerate(b, name+"/"+label+"-seeded", p, sk, spec, gal, workers, true)
		}
	}
}

func benchGenerate(b *testing.B, name string, p *Params, sk *rlwe.SecretKey, spec KeySpec, gal []uint64, workers int, seeded bool) {
	b.Run(name, func(b *testing.B) {
		store, err := OpenDirBlobs(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		var bytes int64
		for b.Loop() {
			blobs, err := Generate(context.Background(), p, sk, spec, gal, store, workers, nil, seeded)
			if err != nil {
				b.Fatal(err)
			}
			bytes = 0
			for _, bl := range blobs {
				bytes += bl.Size
			}
			// Remove this keyset before the next one, outside the
			// timing: the disk stays bounded, and the next keyset
			// writes into page cache the kernel has used before, as on
			// a server that has been up for a while (on this VM, the
			// first write to never-touched guest memory runs at about
			// a quarter of the usual speed: see BENCHMARKS.md).
			b.StopTimer()
			for _, bl := range blobs {
				if err := store.Remove(context.Background(), bl.Digest); err != nil {
					b.Fatal(err)
				}
			}
			b.StartTimer()
		}
		b.ReportMetric(float64(bytes)/(1<<20), "MiB/keyset")
	})
}
