package he

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"math/bits"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring"
	"github.com/tuneinsight/lattigo/v6/ring/ringqp"
	"github.com/tuneinsight/lattigo/v6/utils/sampling"
)

// Keys are generated here rather than by rlwe.KeyGenerator, whose
// uniform halves a caller cannot choose since Lattigo v6.2.0 (its
// Encryptor.WithPRNG is gone). Each key's uniform halves "a" come from
// its own fresh 32-byte seed: a key is (b, a) over QP in the NTT and
// Montgomery domain with
//
//	b = MForm(NTT(e)) - a ⊙ s_out  [+ P·w_i·s_in on the i-th RNS digit]
//
// exactly as rlwe.KeyGenerator computes it, e a fresh discrete Gaussian
// at level Q (from crypto/rand) extended to P, and a from the seed. So a
// key is its b halves and its seed, and ExpandA rebuilds the a halves
// from the seed alone.
//
// The a halves are AES-256 in counter mode, one stream per (entry, RNS
// limb): key SHA-256("kmsd-a-aes-v1" ‖ seed), counter block entry (4
// bytes) ‖ limb (2 bytes) ‖ zeros; a coefficient is the next 8 bytes,
// little-endian, masked to the modulus' bit length and rejected unless
// below it. This is kmsd's own specification, so a stored seed means the
// same keys whatever Lattigo's samplers do, and limbs expand in parallel
// on AES-NI at gigabytes a second.
//
// The seed is public (it is the a halves): the argument is the usual one
// for seeded public matrices (AES under a known key as an ideal cipher),
// and it needs the seed fresh per key from crypto/rand, independent of
// every secret. Two keys sharing a would leak the secret (the difference
// of their b halves), so a seed is never reused.

// ASeedSize is the size of a key's seed for its a halves.
const ASeedSize = 32

// newASeed is a fresh seed from the OS.
func newASeed() (*[ASeedSize]byte, error) {
	var s [ASeedSize]byte
	if _, err := rand.Read(s[:]); err != nil {
		return nil, err
	}
	return &s, nil
}

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
	mask := uint64(1)<<uint(bits.Len64(q)) - 1
	if q >= 1<<62 {
		return fmt.Errorf("modulus %d is too large", q)
	}
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

// ExpandA writes the a halves of a key's entries (entry k: the k-th a of
// the key, row-major over its gadget) from its seed, at levels levelQ and
// levelP (-1: no P).
func ExpandA(params rlwe.Parameters, seed *[ASeedSize]byte, levelQ, levelP int, entries []ringqp.Poly) error {
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

// keyGen makes keys under one secret key. Not safe for concurrent use
// (its error sampler): one per goroutine.
type keyGen struct {
	params rlwe.Parameters
	sk     *rlwe.SecretKey
	xe     ring.Sampler
}

func newKeyGen(params rlwe.Parameters, sk *rlwe.SecretKey) (*keyGen, error) {
	prng, err := sampling.NewPRNG() // crypto/rand since Lattigo v6.2.0
	if err != nil {
		return nil, err
	}
	xe, err := ring.NewSampler(prng, params.RingQ(), params.Xe(), false)
	if err != nil {
		return nil, err
	}
	return &keyGen{params: params, sk: sk, xe: xe}, nil
}

// encryptZero sets b = MForm(NTT(e)) - a ⊙ skOut.
func (g *keyGen) encryptZero(levelQ, levelP int, skOut, a, b ringqp.Poly) {
	rqp := g.params.RingQP().AtLevel(levelQ, levelP)
	g.xe.AtLevel(levelQ).Read(b.Q)
	if levelP != -1 {
		rqp.ExtendBasisSmallNormAndCenter(b.Q, levelP, b.Q, b.P)
	}
	rqp.NTT(b, b)
	rqp.MForm(b, b)
	rqp.MulCoeffsMontgomeryThenSub(a, skOut, b)
}

// publicKey makes pk = (b, a), a from seed.
func (g *keyGen) publicKey(seed *[ASeedSize]byte) (*rlwe.PublicKey, error) {
	pk := rlwe.NewPublicKey(g.params)
	lq, lp := pk.LevelQ(), pk.LevelP()
	if err := ExpandA(g.params, seed, lq, lp, []ringqp.Poly{pk.Value[1]}); err != nil {
		return nil, err
	}
	g.encryptZero(lq, lp, g.sk.Value, pk.Value[1], pk.Value[0])
	return pk, nil
}

// gadgetEntries lists a gadget ciphertext's a halves, row-major.
func gadgetEntries(gct *rlwe.GadgetCiphertext) []ringqp.Poly {
	var as []ringqp.Poly
	for i := range gct.Value {
		for j := range gct.Value[i] {
			as = append(as, gct.Value[i][j][1])
		}
	}
	return as
}

// gadget fills gct with an encryption of skIn under skOut, a from seed.
func (g *keyGen) gadget(skIn ring.Poly, skOut ringqp.Poly, gct *rlwe.GadgetCiphertext, seed *[ASeedSize]byte) error {
	lq, lp := gct.LevelQ(), gct.LevelP()
	if err := ExpandA(g.params, seed, lq, lp, gadgetEntries(gct)); err != nil {
		return err
	}
	for i := range gct.Value {
		for j := range gct.Value[i] {
			g.encryptZero(lq, lp, skOut, gct.Value[i][j][1], gct.Value[i][j][0])
		}
	}
	return rlwe.AddPolyTimesGadgetVectorToGadgetCiphertext(skIn, []rlwe.GadgetCiphertext{*gct}, *g.params.RingQP(), g.params.RingQ().NewPoly())
}

// relinearizationKey encrypts s² under s.
func (g *keyGen) relinearizationKey(seed *[ASeedSize]byte) (*rlwe.RelinearizationKey, error) {
	rlk := rlwe.NewRelinearizationKey(g.params)
	lq := rlk.LevelQ()
	sk2 := g.params.RingQ().NewPoly()
	sk2.CopyLvl(lq, g.sk.Value.Q)
	g.params.RingQ().AtLevel(lq).MulCoeffsMontgomery(sk2, g.sk.Value.Q, sk2)
	return rlk, g.gadget(sk2, g.sk.Value, &rlk.GadgetCiphertext, seed)
}

// galoisKey encrypts s under π_{galEl⁻¹}(s), as rlwe.KeyGenerator does
// (the evaluator switches, then applies the automorphism). gk, if not
// nil, is reused.
func (g *keyGen) galoisKey(galEl uint64, seed *[ASeedSize]byte, gk *rlwe.GaloisKey) (*rlwe.GaloisKey, error) {
	if gk == nil {
		gk = rlwe.NewGaloisKey(g.params)
	}
	lq, lp := gk.LevelQ(), gk.LevelP()
	rqp := g.params.RingQP().AtLevel(lq, lp)
	skOut := rqp.NewPoly()
	index, err := ring.AutomorphismNTTIndex(rqp.RingQ.N(), rqp.RingQ.NthRoot(), g.params.ModInvGaloisElement(galEl))
	if err != nil {
		return nil, err
	}
	rqp.RingQ.AutomorphismNTTWithIndex(g.sk.Value.Q, index, skOut.Q)
	if rqp.RingP != nil {
		rqp.RingP.AutomorphismNTTWithIndex(g.sk.Value.P, index, skOut.P)
	}
	if err := g.gadget(g.sk.Value.Q, skOut, &gk.GadgetCiphertext, seed); err != nil {
		return nil, err
	}
	gk.GaloisElement, gk.NthRoot = galEl, rqp.RingQ.NthRoot()
	return gk, nil
}

// switchingKey is a key-switching key from skIn (a key of the same
// parameters) to the generator's key.
func (g *keyGen) switchingKey(skIn *rlwe.SecretKey, seed *[ASeedSize]byte) (*rlwe.EvaluationKey, error) {
	k := rlwe.NewEvaluationKey(g.params)
	return k, g.gadget(skIn.Value.Q, g.sk.Value, &k.GadgetCiphertext, seed)
}
