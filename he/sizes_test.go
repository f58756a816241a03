package he

import (
	"testing"

	"github.com/kmsd-project/kmsd/he/seedkey"
)

// TestSeededKeysetSizes: a preset's keyset (public, relinearization and a
// Galois key per power of two) seeded is at most 51% of its full size, at
// every preset (computed from the parameters: nothing is generated). -v
// prints the table BENCHMARKS.md quotes.
func TestSeededKeysetSizes(t *testing.T) {
	for _, preset := range []string{"ckks-logn13", "ckks-logn14", "ckks-logn15", "ckks-logn16", "bgv-logn13", "bgv-logn14", "bgv-logn15"} {
		s, slots := CKKS, 0
		if preset[:3] == "bgv" {
			s = BGV
		}
		p, err := Resolve(s, []byte(`"`+preset+`"`))
		if err != nil {
			t.Fatal(err)
		}
		if s == CKKS {
			slots = p.CKKS.MaxSlots()
		} else {
			slots = p.BGV.MaxSlots() / 2
		}
		n := 0
		for k := 1; k < slots; k *= 2 {
			n++
		}
		pk, rlk, gk := KeySizes(p)
		full := int64(pk) + int64(rlk) + int64(n)*int64(gk)
		spk, _ := seedkey.Size(p.RLWE(), seedkey.Public)
		srlk, _ := seedkey.Size(p.RLWE(), seedkey.Relinearization)
		sgk, _ := seedkey.Size(p.RLWE(), seedkey.Galois)
		seeded := int64(spk) + int64(srlk) + int64(n)*int64(sgk)
		r := float64(seeded) / float64(full)
		t.Logf("| %s | %d | %.1f | %.1f | %.2f%% |", preset, n, float64(full)/(1<<20), float64(seeded)/(1<<20), 100*r)
		if r > 0.51 {
			t.Errorf("%s: seeded keyset %.3f of the full one", preset, r)
		}
	}
}
