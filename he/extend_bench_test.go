package he

import (
	"context"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"
)

// BenchmarkOnDemandGalois is the work behind POST .../evaluation-keys for
// one missing rotation: one Galois key generated from the version's
// secret key and written, seeded, to the blob store (fsync included),
// as kmsd does it (the unsealing of the seed, one HSM call, and the
// signature of the extension are not in it). Run with
// -bench OnDemandGalois -benchtime 3x -benchmem.
func BenchmarkOnDemandGalois(b *testing.B) {
	for _, name := range []string{"ckks-logn13", "ckks-logn14", "ckks-logn15", "ckks-logn16"} {
		p, err := Resolve(CKKS, []byte(`"`+name+`"`))
		if err != nil {
			b.Fatal(err)
		}
		sk, _ := SecretKey(p.RLWE(), make([]byte, SeedSize))
		gal := []uint64{p.CKKS.GaloisElementForRotation(3)}
		b.Run(name, func(b *testing.B) {
			store, err := OpenDirBlobs(b.TempDir())
			if err != nil {
				b.Fatal(err)
			}
			var size int64
			for b.Loop() {
				blobs, err := GenerateGalois(context.Background(), p, sk, gal, store, 0, nil, true)
				if err != nil {
					b.Fatal(err)
				}
				size = blobs[0].Size
				b.StopTimer()
				_ = store.Remove(context.Background(), blobs[0].Digest)
				b.StartTimer()
			}
			b.ReportMetric(float64(size)/(1<<20), "MiB/key")
		})
	}
}

// BenchmarkRekey is a re-keying: the switching key's generation (once per
// pair of versions, at kmsd) and its use on one ciphertext at the top
// level (per ciphertext, at the client or kmsd-mcp). Run with
// -bench Rekey -benchtime 5x -benchmem.
func BenchmarkRekey(b *testing.B) {
	for _, name := range []string{"ckks-logn13", "ckks-logn14", "ckks-logn15", "ckks-logn16"} {
		p, err := Resolve(CKKS, []byte(`"`+name+`"`))
		if err != nil {
			b.Fatal(err)
		}
		rp := p.RLWE()
		seed := make([]byte, SeedSize)
		skFrom, _ := SecretKey(rp, seed)
		seed[0] = 1
		skTo, _ := SecretKey(rp, seed)
		store, err := OpenDirBlobs(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		b.Run(name+"/switching-key", func(b *testing.B) {
			for b.Loop() {
				bl, err := GenerateSwitching(context.Background(), p, skFrom, skTo, store, true)
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				_ = store.Remove(context.Background(), bl.Digest)
				b.StartTimer()
			}
		})
		kg, err := newKeyGen(rp, skTo)
		if err != nil {
			b.Fatal(err)
		}
		aseed, _ := newASeed()
		swk, err := kg.switchingKey(skFrom, aseed)
		if err != nil {
			b.Fatal(err)
		}
		pt := ckks.NewPlaintext(p.CKKS, p.CKKS.MaxLevel())
		ct, err := rlwe.NewEncryptor(rp, skFrom).EncryptNew(pt)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(name+"/rekey-ciphertext", func(b *testing.B) {
			eval := rlwe.NewEvaluator(rp, nil)
			out := rlwe.NewCiphertext(rp, 1, ct.Level())
			for b.Loop() {
				if err := eval.ApplyEvaluationKey(ct, swk, out); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
