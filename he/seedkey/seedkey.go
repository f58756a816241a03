// Package seedkey is the seeded form of kmsd's HE public and evaluation
// keys: a key's b halves and the 32-byte seed its uniform a halves come
// from, about half the bytes of the key. Expand rebuilds the key, equal
// byte for byte to the full form. It is linked by the SDK (api/client/
// hekeys) and by kmsd, which generates the keys (he.Generate).
//
// The a halves are AES-256 in counter mode, one stream per (entry, RNS
// limb): key SHA-256("kmsd-a-aes-v1" ‖ seed), counter block entry (4
// bytes) ‖ limb (2 bytes) ‖ zeros; a coefficient is the next 8 bytes,
// little-endian, masked to the modulus' bit length and kept if below it.
// This is kmsd's specification, not Lattigo's sampler (whose byte use
// changed between Lattigo versions), so a stored seed means the same key
// whatever Lattigo links. Entries are a key's gadget rows in row-major
// order (the public key: one).
//
// Security: the seed is public (the a halves are part of every key), so
// the argument is the usual one for seeded public matrices, AES under a
// known key taken as an ideal cipher; it needs each key's seed fresh from
// crypto/rand, independent of every secret, never reused (two keys
// sharing a halves leak the secret through their b halves).
package seedkey

import (
	"bufio"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring/ringqp"
	"github.com/tuneinsight/lattigo/v6/utils/buffer"
)

// SeedSize is the size of a key's seed.
const SeedSize = 32

// Kind is what a seeded key is.
type Kind byte

const (
	Public          Kind = 1
	Relinearization Kind = 2
	Galois          Kind = 3
	Switching       Kind = 4
)

func (k Kind) String() string {
	switch k {
	case Public:
		return "public"
	case Relinearization:
		return "relinearization"
	case Galois:
		return "galois"
	case Switching:
		return "switching"
	}
	return fmt.Sprintf("kind(%d)", byte(k))
}

// magic starts every seeded key; version 1 is this format.
const (
	magic      = "KMSDSEED"
	version    = 1
	headerSize = len(magic) + 1 + 1 + 6 + 8 + SeedSize // 56
)

// IsSeeded reports whether b starts as a seeded key does (its first 8
// bytes suffice; Expand checks the rest).
func IsSeeded(b []byte) bool { return len(b) >= len(magic) && string(b[:len(magic)]) == magic }

// ctrStream is AES-CTR keystream (CTR over zeros).
type ctrStream struct{ s cipher.Stream }

func (c ctrStream) Read(p []byte) (int, error) {
	clear(p)
	c.s.XORKeyStream(p, p)
	return len(p), nil
}

// sampleLimb fills coeffs with integers uniform in [0, q) from r: each
// candidate is the next 8 bytes little-endian, masked to bitlen(q), kept
// if below q. The result depends on the stream only, not on buf's size.
func sampleLimb(r io.Reader, q uint64, coeffs []uint64, buf []byte) error {
	if q >= 1<<62 {
		return fmt.Errorf("modulus %d is too large", q)
	}
	mask := uint64(1)<<uint(bits.Len64(q)) - 1
	ptr := len(buf)
	for i := 0; i < len(coeffs); {
		if ptr == len(buf) {
			if _, err := io.ReadFull(r, buf); err != nil {
				return err
			}
			ptr = 0
		}
		for ; ptr+8 <= len(buf) && i < len(coeffs); ptr += 8 {
			v := binary.LittleEndian.Uint64(buf[ptr:]) & mask
			coeffs[i] = v
			i += int((v - q) >> 63) // 1 iff v < q (both below 2^62)
		}
	}
	return nil
}

// ExpandA writes the a halves of a key's entries from its seed, at levels
// levelQ and levelP (-1: no P).
func ExpandA(params rlwe.Parameters, seed *[SeedSize]byte, levelQ, levelP int, entries []ringqp.Poly) error {
	h := sha256.Sum256(append([]byte("kmsd-a-aes-v1"), seed[:]...))
	block, err := aes.NewCipher(h[:])
	if err != nil {
		return err
	}
	qs := params.RingQ().ModuliChain()
	var ps []uint64
	if params.RingP() != nil {
		ps = params.RingP().ModuliChain()
	}
	buf := make([]byte, 8<<10)
	limb := func(e, l int, q uint64, coeffs []uint64) error {
		var iv [aes.BlockSize]byte
		binary.BigEndian.PutUint32(iv[0:4], uint32(e))
		binary.BigEndian.PutUint16(iv[4:6], uint16(l))
		return sampleLimb(ctrStream{cipher.NewCTR(block, iv[:])}, q, coeffs, buf)
	}
	for e, a := range entries {
		for l := 0; l <= levelQ; l++ {
			if err := limb(e, l, qs[l], a.Q.Coeffs[l]); err != nil {
				return err
			}
		}
		for l := 0; l <= levelP; l++ {
			if err := limb(e, levelQ+1+l, ps[l], a.P.Coeffs[l]); err != nil {
				return err
			}
		}
	}
	return nil
}

// GadgetEntries lists a gadget ciphertext's entries (b, a), row-major.
func GadgetEntries(gct *rlwe.GadgetCiphertext) [][2]*ringqp.Poly {
	var out [][2]*ringqp.Poly
	for i := range gct.Value {
		for j := range gct.Value[i] {
			out = append(out, [2]*ringqp.Poly{&gct.Value[i][j][0], &gct.Value[i][j][1]})
		}
	}
	return out
}

// Key is a public or evaluation key: *rlwe.PublicKey,
// *rlwe.RelinearizationKey, *rlwe.GaloisKey or *rlwe.EvaluationKey.
type Key interface {
	MarshalBinary() ([]byte, error)
}

// entries are a key's (b, a) entries and levels, and its kind.
func entries(k Key) (Kind, [][2]*ringqp.Poly, int, int, uint64, error) {
	switch k := k.(type) {
	case *rlwe.PublicKey:
		return Public, [][2]*ringqp.Poly{{&k.Value[0], &k.Value[1]}}, k.LevelQ(), k.LevelP(), 0, nil
	case *rlwe.RelinearizationKey:
		return Relinearization, GadgetEntries(&k.GadgetCiphertext), k.LevelQ(), k.LevelP(), 0, nil
	case *rlwe.GaloisKey:
		return Galois, GadgetEntries(&k.GadgetCiphertext), k.LevelQ(), k.LevelP(), k.GaloisElement, nil
	case *rlwe.EvaluationKey:
		return Switching, GadgetEntries(&k.GadgetCiphertext), k.LevelQ(), k.LevelP(), 0, nil
	}
	return 0, nil, 0, 0, 0, fmt.Errorf("seedkey: %T is not a key kmsd seeds", k)
}

// Encode writes the seeded form of k, whose a halves came from seed: the
// header, then each entry's b half (Lattigo's encoding of a QP
// polynomial), row-major.
func Encode(w io.Writer, k Key, seed *[SeedSize]byte) error {
	kind, es, _, _, gal, err := entries(k)
	if err != nil {
		return err
	}
	hdr := make([]byte, 0, headerSize)
	hdr = append(hdr, magic...)
	hdr = append(hdr, version, byte(kind), 0, 0, 0, 0, 0, 0)
	hdr = binary.BigEndian.AppendUint64(hdr, gal)
	hdr = append(hdr, seed[:]...)
	bw := bufio.NewWriterSize(w, 1<<16)
	if _, err := bw.Write(hdr); err != nil {
		return err
	}
	for _, e := range es {
		if _, err := e[0].WriteTo(bw); err != nil {
			return err
		}
	}
	return bw.Flush()
}

// Size is the size of a seeded key of kind for params.
func Size(params rlwe.Parameters, kind Kind) (int, error) {
	k, err := newKey(params, kind, 0)
	if err != nil {
		return 0, err
	}
	_, es, _, _, _, _ := entries(k)
	n := headerSize
	for _, e := range es {
		n += e[0].BinarySize()
	}
	return n, nil
}

func newKey(params rlwe.Parameters, kind Kind, gal uint64) (Key, error) {
	switch kind {
	case Public:
		return rlwe.NewPublicKey(params), nil
	case Relinearization:
		return rlwe.NewRelinearizationKey(params), nil
	case Galois:
		gk := rlwe.NewGaloisKey(params)
		gk.GaloisElement, gk.NthRoot = gal, params.RingQ().NthRoot()
		return gk, nil
	case Switching:
		return rlwe.NewEvaluationKey(params), nil
	}
	return nil, fmt.Errorf("seedkey: unknown kind %d", kind)
}

// layoutMatches reports whether b, one entry's b half in Lattigo's
// encoding of a QP polynomial (for Q then P: a count of limbs, then each
// limb's length and coefficients, 8 bytes each), has the count and length
// fields of tmpl, the encoding of such a polynomial for the parameters.
func layoutMatches(b, tmpl []byte, limbsQ, limbsP, n int) bool {
	if len(b) != len(tmpl) {
		return false
	}
	off := 0
	for _, limbs := range []int{limbsQ, max(limbsP, 0)} {
		if off+8 > len(b) || string(b[off:off+8]) != string(tmpl[off:off+8]) {
			return false
		}
		off += 8
		for i := 0; i < limbs; i++ {
			if off+8 > len(b) || string(b[off:off+8]) != string(tmpl[off:off+8]) {
				return false
			}
			off += 8 + 8*n
		}
	}
	return off == len(b)
}

// ErrMalformed: the bytes are not a seeded key of these parameters.
var ErrMalformed = errors.New("not a seeded key of these parameters")

// Expand rebuilds the key a seeded form holds, for params; its kind must
// be want. The size is checked before anything is decoded (Lattigo's
// decoders do not survive a truncated input).
func Expand(params rlwe.Parameters, want Kind, b []byte) (Key, error) {
	if len(b) < headerSize || !IsSeeded(b) || b[len(magic)] != version || Kind(b[len(magic)+1]) != want {
		return nil, fmt.Errorf("%w: not a version %d seeded %s key", ErrMalformed, version, want)
	}
	for _, c := range b[len(magic)+2 : len(magic)+8] {
		if c != 0 {
			return nil, fmt.Errorf("%w: reserved header bytes are set", ErrMalformed)
		}
	}
	gal := binary.BigEndian.Uint64(b[len(magic)+8:])
	var seed [SeedSize]byte
	copy(seed[:], b[len(magic)+16:headerSize])
	if size, err := Size(params, want); err != nil || size != len(b) {
		return nil, fmt.Errorf("%w: %d bytes, want %d", ErrMalformed, len(b), size)
	}
	if (want == Galois) != (gal != 0) {
		return nil, fmt.Errorf("%w: Galois element %d for a %s key", ErrMalformed, gal, want)
	}
	k, err := newKey(params, want, gal)
	if err != nil {
		return nil, err
	}
	_, es, lq, lp, _, _ := entries(k)
	// The layout is the parameters': every count and length field of the
	// b halves must be what a key of these parameters has (Lattigo's
	// decoder would trust them, and allocate what they say).
	tmpl, err := es[0][0].MarshalBinary()
	if err != nil {
		return nil, err
	}
	for i := range es {
		if !layoutMatches(b[headerSize+i*len(tmpl):headerSize+(i+1)*len(tmpl)], tmpl, lq+1, lp+1, params.N()) {
			return nil, fmt.Errorf("%w: entry %d's layout is not the parameters'", ErrMalformed, i)
		}
	}
	r := buffer.NewBuffer(b[headerSize:])
	as := make([]ringqp.Poly, len(es))
	for i, e := range es {
		if _, err := e[0].ReadFrom(r); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		if e[0].LevelQ() != lq || e[0].LevelP() != lp || e[0].Q.N() != params.N() {
			return nil, fmt.Errorf("%w: entry %d has other levels or degree", ErrMalformed, i)
		}
		as[i] = *e[1]
	}
	if err := ExpandA(params, &seed, lq, lp, as); err != nil {
		return nil, err
	}
	return k, nil
}
