package seedkey_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"testing"

	"github.com/kmsd-project/kmsd/he/seedkey"
)

// TestExpandRefusesBadInnerLengths: a seeded key of exactly the
// right size whose inner Lattigo length fields lie (the b halves' limb
// count or a limb's coefficient count) must be refused with ErrMalformed.
// Expand checks only the total size before handing the bytes to
// Lattigo's decoders, which trust those fields: a negative length panics
// (slice bounds), a huge one panics in makeslice, and a large-but-possible
// one (say 2^31 limbs) allocates tens of GiB before failing. The package
// doc and the commit say Expand checks before decoding; the SDK links it.
func TestExpandRefusesBadInnerLengths(t *testing.T) {
	params := paramSets(t)["ckks"]
	seed := &[32]byte{7}
	for _, kind := range []seedkey.Kind{seedkey.Public, seedkey.Galois} {
		k := keyWithSeed(t, params, kind, seed)
		var b bytes.Buffer
		if err := seedkey.Encode(&b, k, seed); err != nil {
			t.Fatal(err)
		}
		good := b.Bytes()
		for name, c := range map[string]struct {
			off int
			v   uint64
		}{
			"limb length -1":     {64, ^uint64(0)}, // first b half, Q, limb 0's length
			"limb count 2^55":    {56, 1 << 55},    // first b half, Q's limb count
			"limb length 2^60":   {64, 1 << 60},
			"limb count -(2^62)": {56, ^uint64(0) - 1<<62},
		} {
			bad := append([]byte(nil), good...)
			binary.LittleEndian.PutUint64(bad[c.off:], c.v)
			err := func() (err error) {
				defer func() {
					if r := recover(); r != nil {
						err = fmt.Errorf("panic: %v", r)
					}
				}()
				_, err = seedkey.Expand(params, kind, bad)
				return err
			}()
			if !errors.Is(err, seedkey.ErrMalformed) {
				t.Errorf("%s key, %s: %v (want ErrMalformed)", kind, name, err)
			}
		}
	}
}
