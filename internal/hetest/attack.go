// Package hetest holds the key-recovery attacks on HE decryption that the
// tests attempt against kmsd (he, api, kmsd-mcp), so that each asserts
// that an attack fails, not only that a request is refused.
package hetest

import (
	"math"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"
)

// symmetric returns the coefficients (centered mod q0) of the encoding of
// vals (the real parts of all slots) at scale: the conjugate-symmetric
// part of a plaintext polynomial, times scale.
func symmetric(params ckks.Parameters, vals []float64, scale float64) []float64 {
	pt := ckks.NewPlaintext(params, 0)
	pt.Scale = rlwe.NewScale(scale)
	full := make([]float64, params.MaxSlots())
	copy(full, vals)
	if err := ckks.NewEncoder(params).Encode(full, pt); err != nil {
		panic(err)
	}
	r := params.RingQ().AtLevel(0)
	if pt.IsNTT {
		r.INTT(pt.Value, pt.Value)
	}
	q0 := params.Q()[0]
	out := make([]float64, params.N())
	for i, c := range pt.Value.Coeffs[0] {
		if c > q0/2 {
			out[i] = -float64(q0 - c)
		} else {
			out[i] = float64(c)
		}
	}
	return out
}

// RecoverFromChosen is the review's attack: v1 and v2 are the values (all
// slots, real parts) a decryptor got for the chosen ciphertexts (0, c) and
// (0, c*X^(N/2)) at the given scale; their phases are c*s and c*X^(N/2)*s,
// and the real parts of the slots give the conjugate-symmetric parts of
// both, from which every coefficient of s follows. It returns its guess
// of s.
func RecoverFromChosen(params ckks.Parameters, v1, v2 []float64, scale, c float64) []float64 {
	n := params.N()
	h := n / 2
	a1 := symmetric(params, v1, 2*scale/c) // a1[0] = 2 s_0, a1[i] = s_i - s_(N-i)
	a2 := symmetric(params, v2, 2*scale/c) // t = X^(N/2) s: a2[0] = 2 t_0, a2[i] = t_i - t_(N-i)
	s := make([]float64, n)
	s[0] = math.Round(a1[0] / 2)
	s[h] = math.Round(-a2[0] / 2)
	for i := 1; i < h; i++ {
		u, w := a1[h+i], a2[i]
		s[h+i] = math.Round((u - w) / 2)
		s[h-i] = math.Round((-w - u) / 2)
	}
	return s
}

// TernaryFraction is the fraction of a guess's coefficients in {-1, 0, 1}:
// 1 for a recovered uniform ternary secret, near 0 for a guess drowned in
// noise.
func TernaryFraction(s []float64) float64 {
	k := 0
	for _, x := range s {
		if x >= -1 && x <= 1 {
			k++
		}
	}
	return float64(k) / float64(len(s))
}

// IsSecret reports whether guess (coefficients) is the secret key of pk:
// whether b + a*guess, mod the first prime, is as small as the public
// key's error (a wrong guess leaves it uniform). The public key's
// polynomials are taken in the NTT domain, with or without Montgomery
// form (whichever makes the right key check).
func IsSecret(params ckks.Parameters, pk *rlwe.PublicKey, guess []float64) bool {
	r := params.RingQ().AtLevel(0)
	q0 := params.Q()[0]
	s := r.NewPoly()
	for i, x := range guess {
		v := int64(math.Round(x)) % int64(q0)
		if v < 0 {
			v += int64(q0)
		}
		s.Coeffs[0][i] = uint64(v)
	}
	r.NTT(s, s)
	for _, montgomery := range []bool{true, false} {
		a, b := r.NewPoly(), r.NewPoly()
		copy(a.Coeffs[0], pk.Value[1].Q.Coeffs[0])
		copy(b.Coeffs[0], pk.Value[0].Q.Coeffs[0])
		if montgomery {
			r.IMForm(a, a)
			r.IMForm(b, b)
		}
		e := r.NewPoly()
		r.MulCoeffsBarrett(a, s, e)
		r.Add(e, b, e)
		r.INTT(e, e)
		small := true
		for _, c := range e.Coeffs[0] {
			if c > 1<<20 && q0-c > 1<<20 {
				small = false
				break
			}
		}
		if small {
			return true
		}
	}
	return false
}
