package he

import (
	crand "crypto/rand"
	"fmt"
	"math"
	"math/big"
	"math/rand/v2"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/ring"

	"github.com/kmsd-project/kmsd/kms"
)

// What decryption reveals, and how it is bounded (README "What decryption
// reveals" gives the argument in full).
//
// A CKKS decryption returns the message plus the ciphertext's noise e. The
// noise is a function of the secret key, so a result returned as it is
// lets its reader solve for the key (Li and Micciancio, Eurocrypt 2021),
// and a chosen ciphertext hands it over at once. kmsd therefore decrypts
// only attested ciphertexts (kms.Attestation) and floods the noise: it adds
// a fresh discrete Gaussian of standard deviation
//
//	sigma_flood = 2^(s/2) * sqrt(64 * Q) * E
//
// to the decrypted plaintext before decoding, with s = StatisticalSecurity
// bits, Q the number of decryptions the version may answer (its budget, or
// kms.DefaultDecryptBudget) and E kmsd's bound on the ciphertext's noise, which
// its attestation carries (NoiseBound). This is the flooding bound of Li,
// Micciancio, Schultz and Sorrell (CRYPTO 2022) that OpenFHE's
// NOISE_FLOODING_DECRYPT mode implements. What remains of the precision is
// returned, and decryption is refused where too little remains.
//
// BGV decrypts exactly: the result is the message, whatever the noise, as
// long as the noise stays under the modulus. The attacks on exact schemes
// (Cheon, Choe, Passelègue, Stehlé and Suvanto 2024) use ciphertexts whose
// decryption may fail; kmsd refuses a BGV decryption unless the attested
// noise bound shows it correct, a decision made from public data only,
// never from the decrypted value.

const (
	// StatisticalSecurity is s, in bits.
	StatisticalSecurity = 30
	// MinFloodPrecision is the fewest bits a CKKS decryption may return
	// after flooding; below it the decryption is refused.
	MinFloodPrecision = 6
	// MaxDecryptLogPrecision is the most a policy may ask for: no
	// parameters allowed here leave more after flooding.
	MaxDecryptLogPrecision = 30
	// tail is the factor from a standard deviation to a bound on the
	// largest of a ciphertext's coefficients (a Gaussian exceeds 9 sigma
	// with probability below 2^-57).
	tail = 9
	// noiseMargin is the factor by which NoiseBound's standard deviation
	// is raised, for the terms it does not model (encoding errors of
	// plaintext weights, products of noises).
	noiseMargin = 2
)

// noiseTerms are the per-parameter standard deviations of the noise
// model, per coefficient of the error polynomial.
type noiseTerms struct {
	round float64 // a rescale's or a ModDown's rounding
	ks    float64 // a key switch
	fresh float64 // a fresh encryption with the public key
	t     float64 // BGV plaintext modulus (1 for CKKS): the phase's noise is t*e
}

func (k *Kind) terms(p *Params) noiseTerms {
	rp := p.RLWE()
	n := float64(rp.N())
	h := 2 * n / 3 // uniform ternary secret (the allow-list admits no other)
	sigma := 3.2
	if g, ok := rp.Xe().(ring.DiscreteGaussian); ok {
		sigma = g.Sigma
	}
	round := math.Sqrt((h + 1) / 12)
	nt := noiseTerms{round: round, ks: round, fresh: sigma * math.Sqrt(2*h+1), t: 1}
	// Hybrid key switching: each digit (up to P's number of Q primes, a
	// uniform residue below its modulus D_i) times the key's error, summed
	// over the digits and divided by P; then the ModDown's rounding.
	if nq, np := rp.QCount(), rp.PCount(); np > 0 {
		q := rp.Q()
		logP := 0.0
		for _, p := range rp.P() {
			logP += math.Log2(float64(p))
		}
		digits := 0.0 // sum of (D_i/P)^2
		for i := 0; i < nq; i += np {
			d := 0.0
			for j := i; j < i+np && j < nq; j++ {
				d += math.Log2(float64(q[j]))
			}
			digits += math.Exp2(2 * (d - logP))
		}
		nt.ks = math.Sqrt(n/12*digits)*sigma + round
		nt.fresh = round // Lattigo encrypts in QP and divides by P
	}
	if k.scheme == BGV {
		nt.t = float64(p.BGV.PlaintextModulus())
	}
	return nt
}

// NoiseBound implements kms.DecryptingKind. The model propagates
// variances (the average-case analysis of CKKS noise): an evaluation that
// multiplies the standard deviation of its inputs' noise by at most
// amplification A, does K key switches whose noise no later rescale
// divides, and d rescales (d: the levels below the top) has
//
//	var_out = margin^2 * (A^2 + 1) * (sum var_in + K * var_ks + (d + 1) * var_round)
//
// and the bound is tail times its standard deviation. TestNoiseBoundHolds
// (hemcp) checks it against the noise of every kmsd-mcp operation.
func (k *Kind) NoiseBound(manifest []byte, level int, in []float64, amplification float64, keySwitches int) (float64, error) {
	p, err := k.versionParams(manifest)
	if err != nil {
		return 0, err
	}
	rp := p.RLWE()
	if level < 0 || level > rp.MaxLevel() {
		return 0, kms.Errorf(kms.KindInvalid, "level %d: these parameters have levels 0 to %d", level, rp.MaxLevel())
	}
	nt := k.terms(p)
	if len(in) == 0 {
		return math.Log2(tail * nt.t * nt.fresh), nil
	}
	// In log2 of variances, so that no bound overflows a float64.
	var terms []float64
	for _, e := range in {
		if math.IsNaN(e) || math.IsInf(e, 0) {
			return 0, kms.Errorf(kms.KindInvalid, "an input's noise bound is not a number")
		}
		terms = append(terms, 2*(e-math.Log2(tail)))
	}
	if keySwitches > 0 {
		terms = append(terms, math.Log2(float64(keySwitches))+2*math.Log2(nt.t*nt.ks))
	}
	terms = append(terms, math.Log2(float64(rp.MaxLevel()-level+1))+2*math.Log2(nt.t*nt.round))
	logVar := log2SumExp2(terms) + 2*math.Log2(noiseMargin) + math.Log2(amplification*amplification+1)
	bound := math.Log2(tail) + logVar/2
	logQ := 0.0
	for _, q := range rp.Q()[:level+1] {
		logQ += math.Log2(float64(q))
	}
	if !(bound < logQ-1) {
		return 0, kms.Errorf(kms.KindInvalid, "the declared evaluation gives a noise bound of 2^%.0f, more than a ciphertext at level %d holds (2^%.0f): kmsd does not attest what cannot decrypt", bound, level, logQ)
	}
	return bound, nil
}

// log2SumExp2 is log2 of the sum of 2^x over xs, without overflow.
func log2SumExp2(xs []float64) float64 {
	m := math.Inf(-1)
	for _, x := range xs {
		m = math.Max(m, x)
	}
	sum := 0.0
	for _, x := range xs {
		sum += math.Exp2(x - m)
	}
	return m + math.Log2(sum)
}

// FloodSigmaLog2 is log2 of the flooding noise's standard deviation for a
// ciphertext whose noise bound is noiseLog2, decrypted by a version that
// answers queries decryptions.
func FloodSigmaLog2(noiseLog2 float64, queries float64) float64 {
	return noiseLog2 + StatisticalSecurity/2.0 + 0.5*math.Log2(64*queries)
}

// floodPrecision is how many bits of a CKKS slot survive flooding of
// sigma 2^sigmaLog2 at scale: a slot's error is a Gaussian of standard
// deviation sigma*sqrt(N/2)/scale; six of those (exceeded with probability
// 2^-28) stay under half of 2^-p, and the rounding to p bits under the
// other half, so that each value returned is within 2^-p of the exact one.
func floodPrecision(logN int, scale, sigmaLog2 float64) int {
	return int(math.Floor(math.Log2(scale) - sigmaLog2 - 0.5*float64(logN-1) - math.Log2(6) - 1))
}

// DecryptPlan implements kms.DecryptingKind: from the ciphertext's
// attested noise bound and public data only, the precision a CKKS
// decryption keeps after flooding (refused below MinFloodPrecision), or
// whether a BGV decryption is sure to be correct (refused otherwise).
// budget is the version's effective budget (kms.EffectiveDecryptBudget).
func (k *Kind) DecryptPlan(manifest []byte, parsed any, noiseLog2 float64, budget uint64, logPrecision int) (kms.DecryptPlan, error) {
	p, err := k.versionParams(manifest)
	if err != nil {
		return kms.DecryptPlan{}, err
	}
	ct, ok := parsed.(*rlwe.Ciphertext)
	if !ok {
		return kms.DecryptPlan{}, fmt.Errorf("he: wrong ciphertext type")
	}
	rp := p.RLWE()
	if budget == 0 {
		return kms.DecryptPlan{}, fmt.Errorf("he: a decryption plan needs the effective budget (kms.EffectiveDecryptBudget)")
	}
	if math.IsNaN(noiseLog2) || math.IsInf(noiseLog2, 0) {
		return kms.DecryptPlan{}, kms.Errorf(kms.KindInvalid, "the attestation's noise bound is not a number")
	}
	if k.scheme == BGV {
		// Correct iff |m + t*e| < Q_level/2; require a margin of 2 bits.
		logQ := 0.0
		for _, q := range rp.Q()[:ct.Level()+1] {
			logQ += math.Log2(float64(q))
		}
		if noiseLog2+2 > logQ-1 {
			return kms.DecryptPlan{}, kms.Errorf(kms.KindInvalid, "the ciphertext's attested noise (2^%.1f) may exceed what level %d decrypts correctly (2^%.1f): kmsd refuses a decryption that could fail, as such failures leak the secret key", noiseLog2, ct.Level(), logQ-3)
		}
		return kms.DecryptPlan{Queries: float64(budget)}, nil
	}
	q := float64(budget)
	sigma := FloodSigmaLog2(noiseLog2, q)
	scale, _ := ct.Scale.Value.Float64()
	prec := floodPrecision(rp.LogN(), scale, sigma)
	if prec < MinFloodPrecision {
		return kms.DecryptPlan{}, kms.Errorf(kms.KindInvalid, "noise flooding leaves %d bits of precision for this ciphertext (scale 2^%.1f, attested noise 2^%.1f, %.0f decryptions per version), fewer than %d: decrypt a ciphertext at a larger scale, with parameters made for it (a ckks preset), or lower the key's decrypt_budget", prec, math.Log2(scale), noiseLog2, q, MinFloodPrecision)
	}
	return kms.DecryptPlan{Precision: min(prec, logPrecision), FloodSigmaLog2: sigma, Queries: q}, nil
}

// flood adds to the plaintext pt (NTT domain, at its level) a discrete
// Gaussian of standard deviation 2^sigmaLog2, drawn with a ChaCha8 stream
// keyed from the operating system's randomness.
func flood(rp rlwe.Parameters, pt *rlwe.Plaintext, sigmaLog2 float64) error {
	var seed [32]byte
	if _, err := crand.Read(seed[:]); err != nil {
		return fmt.Errorf("flooding seed: %w", err)
	}
	src := rand.New(rand.NewChaCha8(seed))
	sigma := math.Exp2(sigmaLog2)
	level := pt.Level()
	r := rp.RingQ().AtLevel(level)
	noise := r.NewPoly()
	q := rp.Q()[:level+1]
	bq := make([]*big.Int, len(q))
	for i := range q {
		bq[i] = new(big.Int).SetUint64(q[i])
	}
	exact := sigma*tail < 1<<62
	for j := 0; j < rp.N(); j++ {
		x := math.Round(src.NormFloat64() * sigma)
		if exact {
			v := int64(x)
			for i, qi := range q {
				m := v % int64(qi)
				if m < 0 {
					m += int64(qi)
				}
				noise.Coeffs[i][j] = uint64(m)
			}
			continue
		}
		bx, _ := new(big.Float).SetFloat64(x).Int(nil)
		for i := range q {
			noise.Coeffs[i][j] = new(big.Int).Mod(bx, bq[i]).Uint64()
		}
	}
	if pt.IsNTT {
		r.NTT(noise, noise)
	}
	r.Add(pt.Value, noise, pt.Value)
	clear(seed[:]) // the seed is not kept
	return nil
}
