package seedkey_test

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"math/bits"
	"testing"

	"github.com/tuneinsight/lattigo/v6/ring/ringqp"

	"github.com/kmsd-project/kmsd/he/seedkey"
)

// TestExpandAMatchesDocumentedSpec (written by an outside review): an independent
// implementation of the package doc's stream (AES-256 key SHA-256(
// "kmsd-a-aes-v1" ‖ seed), counter block entry(4) ‖ limb(2) ‖ zeros,
// 8-byte little-endian candidates masked to bitlen(q), kept if below q;
// P limbs numbered after Q's) gives ExpandA's a halves for every entry
// and limb, so a client in another language can expand from the doc.
func TestExpandAMatchesDocumentedSpec(t *testing.T) {
	params := paramSets(t)["ckks"]
	seed := &[32]byte{0xAB, 1, 2}
	rqp := params.RingQP()
	as := []ringqp.Poly{rqp.NewPoly(), rqp.NewPoly(), rqp.NewPoly()}
	lq, lp := params.MaxLevelQ(), params.MaxLevelP()
	if err := seedkey.ExpandA(params, seed, lq, lp, as); err != nil {
		t.Fatal(err)
	}
	k := sha256.Sum256(append([]byte("kmsd-a-aes-v1"), seed[:]...))
	block, _ := aes.NewCipher(k[:])
	ref := func(e, l int, q uint64, n int) []uint64 {
		var iv [16]byte
		binary.BigEndian.PutUint32(iv[0:], uint32(e))
		binary.BigEndian.PutUint16(iv[4:], uint16(l))
		s := cipher.NewCTR(block, iv[:])
		mask := uint64(1)<<bits.Len64(q) - 1
		out := make([]uint64, 0, n)
		var b [8]byte
		for len(out) < n {
			clear(b[:])
			s.XORKeyStream(b[:], b[:])
			if v := binary.LittleEndian.Uint64(b[:]) & mask; v < q {
				out = append(out, v)
			}
		}
		return out
	}
	for e := range as {
		for l := 0; l <= lq; l++ {
			if want := ref(e, l, params.Q()[l], params.N()); !equal(want, as[e].Q.Coeffs[l]) {
				t.Fatalf("entry %d Q limb %d differs from the spec", e, l)
			}
		}
		for l := 0; l <= lp; l++ {
			if want := ref(e, lq+1+l, params.P()[l], params.N()); !equal(want, as[e].P.Coeffs[l]) {
				t.Fatalf("entry %d P limb %d differs from the spec", e, l)
			}
		}
	}
	// Distinct (entry, limb) streams never coincide.
	if equal(as[0].Q.Coeffs[0], as[1].Q.Coeffs[0]) || equal(as[0].Q.Coeffs[1][:8], as[0].Q.Coeffs[0][:8]) {
		t.Fatal("two streams coincide")
	}
}

func equal(a, b []uint64) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
