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
