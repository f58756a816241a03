package threshold

import (
	"fmt"
	"slices"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"
)

// BenchmarkSetup is a whole setup among 3 parties (t = 2) in one process,
// one party after the other: the public key, the relinearization key and
// the Galois keys of every power-of-two rotation, as a kmsd policy would
// name them. Per node: the time is the total over 3 (the coordinator's
// sums included); a party sends its two round messages and its Shamir
// shares, and receives the sums twice (round 2, finish). Run with
// -bench Setup -benchtime 1x.
func BenchmarkSetup(b *testing.B) {
	for _, name := range []string{"ckks-logn14", "ckks-logn15"} {
		p := preset(b, name).CKKS
		var gal []uint64
		for r := 1; r < p.MaxSlots(); r *= 2 {
			gal = append(gal, p.GaloisElementForRotation(r))
		}
		slices.Sort(gal)
		gal = slices.Compact(gal)
		b.Run(fmt.Sprintf("%s-%d-galois", name, len(gal)), func(b *testing.B) {
			var sent, received int
			for b.Loop() {
				_, _, tr := runSetup(b, p.Parameters, 3, 2, gal, true)
				sent, received = tr.bytesSent[1], tr.aggBytes
			}
			b.ReportMetric(float64(b.Elapsed().Milliseconds())/float64(b.N)/3, "ms/node")
			b.ReportMetric(float64(sent)/(1<<20), "MiB-sent/node")
			b.ReportMetric(float64(received)/(1<<20), "MiB-received/node")
		})
	}
}

// BenchmarkDecrypt is a threshold decryption of a top-level ciphertext:
// each decrypting node's partial decryption (nodes work in parallel, so
// this is the latency a node adds) and the requester's combination and
// decryption, with 2 and 3 decrypting nodes (t = 2 and t = 3 of 3).
func BenchmarkDecrypt(b *testing.B) {
	for _, name := range []string{"ckks-logn14", "ckks-logn15"} {
		p := preset(b, name).CKKS
		for _, tt := range []int{2, 3} {
			keys, shares, _ := runSetup(b, p.Parameters, 3, tt, nil, false)
			pt := ckks.NewPlaintext(p, p.MaxLevel())
			ct, _ := rlwe.NewEncryptor(p, keys[1].PublicKey).EncryptNew(pt)
			skR, pkR := rlwe.NewKeyGenerator(p).GenKeyPairNew()
			active := []int{1, 2, 3}[:tt]
			var partials [][]byte
			b.Run(fmt.Sprintf("%s/t%d/partial-per-node", name, tt), func(b *testing.B) {
				for b.Loop() {
					out, err := PartialDecrypt(p.Parameters, shares[1], active, ct, pkR, 30)
					if err != nil {
						b.Fatal(err)
					}
					_ = out
				}
			})
			for _, a := range active {
				out, _ := PartialDecrypt(p.Parameters, shares[a], active, ct, pkR, 30)
				partials = append(partials, out)
			}
			b.Run(fmt.Sprintf("%s/t%d/combine-and-decrypt", name, tt), func(b *testing.B) {
				for b.Loop() {
					out, err := Combine(p.Parameters, ct, partials)
					if err != nil {
						b.Fatal(err)
					}
					rlwe.NewDecryptor(p, skR).DecryptNew(out)
				}
				b.ReportMetric(float64(len(partials[0]))/(1<<20), "MiB/partial")
			})
		}
	}
}
