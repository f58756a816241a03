package he

import (
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/kmsd-project/kmsd/kms"
	"github.com/kmsd-project/kmsd/kms/kindtest"
)

// TestKindConformance runs the kind suite over the CKKS and BGV keyset
// kinds at logN 13.
func TestKindConformance(t *testing.T) {
	for _, seeded := range []bool{false, true} {
		t.Run(map[bool]string{false: "full", true: "seeded"}[seeded], func(t *testing.T) {
			store, err := OpenDirBlobs(filepath.Join(t.TempDir(), "blobs"))
			if err != nil {
				t.Fatal(err)
			}
			kindtest.Run(t, Kinds(store, 2, seeded), nil, map[string]kms.Policy{
				"ckks": {Params: json.RawMessage(`"ckks-logn13"`), Rotations: []int{1}, Relinearization: true},
				"bgv":  {Params: json.RawMessage(`"bgv-logn13"`), Rotations: []int{1}},
			})
		})
	}
}

// TestEvaluationKeysNeedP (from an outside review): parameters without
// special primes are refused for a keyset with evaluation keys (their key
// switches add noise as large as the modulus: rotations gave garbage, and
// the noise model under decryption's flooding did not hold), and accepted
// for a public key alone.
func TestEvaluationKeysNeedP(t *testing.T) {
	k := Kinds(nil, 1, true)[0].(*Kind)
	noP := json.RawMessage(`{"LogN":13,"LogQ":[45,35],"LogDefaultScale":35}`)
	for name, p := range map[string]kms.Policy{
		"rotations":       {Params: noP, Rotations: []int{1}},
		"relinearization": {Params: noP, Relinearization: true},
		"conjugation":     {Params: noP, Conjugation: true},
	} {
		if _, _, err := k.CheckPolicy(p); kms.KindOf(err) != kms.KindInvalid {
			t.Errorf("%s without P: %v", name, err)
		}
	}
	if _, _, err := k.CheckPolicy(kms.Policy{Params: noP}); err != nil {
		t.Errorf("a public key alone without P: %v", err)
	}
}
