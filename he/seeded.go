package he

import (
	"crypto/rand"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring"
	"github.com/tuneinsight/lattigo/v6/ring/ringqp"
	"github.com/tuneinsight/lattigo/v6/utils/sampling"

	"github.com/kmsd-project/kmsd/he/seedkey"
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
// key is its b halves and its seed, and seedkey.ExpandA rebuilds the a halves
// from the seed alone.
//
// The a halves and the seeded form are package seedkey's (its doc has
// the stream's specification and the security argument); each seed is
// fresh from crypto/rand for one key.

// ASeedSize is the size of a key's seed for its a halves.
const ASeedSize = seedkey.SeedSize

// newASeed is a fresh seed from the OS.
func newASeed() (*[ASeedSize]byte, error) {
	var s [ASeedSize]byte
	if _, err := rand.Read(s[:]); err != nil {
		return nil, err
	}
	return &s, nil
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
	if err := seedkey.ExpandA(g.params, seed, lq, lp, []ringqp.Poly{pk.Value[1]}); err != nil {
		return nil, err
	}
	g.encryptZero(lq, lp, g.sk.Value, pk.Value[1], pk.Value[0])
	return pk, nil
}

// aHalves lists a gadget ciphertext's a halves, row-major.
func aHalves(gct *rlwe.GadgetCiphertext) []ringqp.Poly {
	var as []ringqp.Poly
	for _, e := range seedkey.GadgetEntries(gct) {
		as = append(as, *e[1])
	}
	return as
}

// gadget fills gct with an encryption of skIn under skOut, a from seed.
func (g *keyGen) gadget(skIn ring.Poly, skOut ringqp.Poly, gct *rlwe.GadgetCiphertext, seed *[ASeedSize]byte) error {
	lq, lp := gct.LevelQ(), gct.LevelP()
	if err := seedkey.ExpandA(g.params, seed, lq, lp, aHalves(gct)); err != nil {
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
