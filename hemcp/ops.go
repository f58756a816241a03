// Package hemcp is the logic of kmsd-mcp: an MCP server that computes on
// CKKS ciphertexts with the evaluation keys of keys held in kmsd. It never
// sees a secret key or a plaintext of its clients: it fetches public and
// evaluation keys through api/client/hekeys (manifest signature and every
// blob digest checked), evaluates, and answers with ciphertext envelopes
// that only a decryptor can open, through kmsd.
package hemcp

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/bits"
	"slices"
	"sort"
	"sync/atomic"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"

	"github.com/kmsd-project/kmsd/api/client/hekeys"
	"github.com/kmsd-project/kmsd/kms/wire"
)

// Engine evaluates on the ciphertexts of one CKKS key version. It is safe
// for concurrent use: Lattigo's evaluator is, since v6.2.0 (before, each
// operation took its own shallow copy), as long as its key set does not
// change; a Galois key loaded later makes a new evaluator (evalState)
// for the operations that start after it.
type Engine struct {
	Keys   *hekeys.Keys
	params ckks.Parameters
	slots  int
	state  atomic.Pointer[evalState]

	// load fetches the Galois keys of rotations (nil: the engine has
	// every key it will ever have). loading serializes loads.
	load    GaloisLoader
	loading chan struct{}
	rlk     *rlwe.RelinearizationKey
	gks     map[uint64]*rlwe.GaloisKey // guarded by loading
}

// GaloisLoader fetches the verified Galois keys of rotations (slots to
// the left) of an engine's key version: from kmsd, which may generate
// them on demand.
type GaloisLoader func(ctx context.Context, rotations []int) ([]*rlwe.GaloisKey, error)

// evalState is an evaluator and the Galois elements its keys cover.
type evalState struct {
	eval   *ckks.Evaluator
	galois map[uint64]bool
}

// MissingRotationError says which slot rotation an operation needs a
// Galois key for that the key version lacks.
type MissingRotationError struct {
	Rotation int // the rotation (slots to the left) the operation needs
	Key      int // the rotation whose Galois key is missing
}

func (e *MissingRotationError) Error() string {
	if e.Key == e.Rotation {
		return fmt.Sprintf("this key version has no Galois key for rotation %d, which the operation needs: create the key (or rotate it after a policy update) with rotations that include %d, or all powers of two below the slot count", e.Rotation, e.Rotation)
	}
	return fmt.Sprintf("this key version has no Galois key for rotation %d (needed to make rotation %d from powers of two): add rotation %d or %d to the key's rotations", e.Key, e.Rotation, e.Key, e.Rotation)
}

// NewEngine makes an engine for a verified CKKS key version with the
// evaluation keys k holds.
func NewEngine(k *hekeys.Keys) (*Engine, error) {
	return NewLazyEngine(k, nil)
}

// NewLazyEngine makes an engine for a verified CKKS key version whose
// Galois keys load calls for when an operation first needs them (k holds
// the relinearization key, and any Galois keys already loaded).
func NewLazyEngine(k *hekeys.Keys, load GaloisLoader) (*Engine, error) {
	if k.Scheme != "ckks" {
		return nil, fmt.Errorf("hemcp: key %s is %s; the tools compute on ckks keys", k.Manifest.Key, k.Scheme)
	}
	e := &Engine{Keys: k, params: k.CKKS, slots: k.CKKS.MaxSlots(), load: load, loading: make(chan struct{}, 1), gks: map[uint64]*rlwe.GaloisKey{}}
	var evk rlwe.EvaluationKeySet = rlwe.NewMemEvaluationKeySet(nil)
	if k.EvaluationKeys != nil {
		evk = k.EvaluationKeys
		e.rlk, _ = k.EvaluationKeys.GetRelinearizationKey()
		for _, g := range k.EvaluationKeys.GetGaloisKeysList() {
			if gk, err := k.EvaluationKeys.GetGaloisKey(g); err == nil {
				e.gks[g] = gk
			}
		}
	}
	st := &evalState{eval: ckks.NewEvaluator(k.CKKS, evk), galois: map[uint64]bool{}}
	for g := range e.gks {
		st.galois[g] = true
	}
	e.state.Store(st)
	return e, nil
}

// Slots is how many values a ciphertext of this version holds.
func (e *Engine) Slots() int { return e.slots }

// Rotations lists the slot rotations (to the left) the version has keys
// for (loaded, or listed in its signed manifest and extension),
// ascending.
func (e *Engine) Rotations() []int {
	listed := e.Keys.GaloisRefs()
	st := e.state.Load()
	var out []int
	for r := 1; r < e.slots; r++ {
		g := e.params.GaloisElement(r)
		if _, ok := listed[g]; ok || st.galois[g] {
			out = append(out, r)
		}
	}
	return out
}

// prepare makes sure the engine's evaluator has the Galois keys of
// rotations, loading those it lacks (a lazy engine); it returns the state
// to evaluate with. An engine without a loader returns its state as it is
// (rotate then makes what it can from powers of two).
func (e *Engine) prepare(ctx context.Context, rotations []int) (*evalState, error) {
	st := e.state.Load()
	if e.load == nil {
		return st, nil
	}
	missing := func(st *evalState) []int {
		var out []int
		for _, r := range rotations {
			r = ((r % e.slots) + e.slots) % e.slots
			if r != 0 && !st.galois[e.params.GaloisElement(r)] && !slices.Contains(out, r) {
				out = append(out, r)
			}
		}
		return out
	}
	if len(missing(st)) == 0 {
		return st, nil
	}
	select {
	case e.loading <- struct{}{}:
		defer func() { <-e.loading }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	st = e.state.Load()
	need := missing(st)
	if len(need) == 0 {
		return st, nil
	}
	gks, err := e.load(ctx, need)
	if err != nil {
		return nil, fmt.Errorf("the Galois keys for rotations %v: %w", need, err)
	}
	for _, gk := range gks {
		e.gks[gk.GaloisElement] = gk
	}
	all := make([]*rlwe.GaloisKey, 0, len(e.gks))
	next := &evalState{galois: map[uint64]bool{}}
	for g, gk := range e.gks {
		all = append(all, gk)
		next.galois[g] = true
	}
	next.eval = ckks.NewEvaluator(e.params, rlwe.NewMemEvaluationKeySet(e.rlk, all...))
	e.state.Store(next)
	return next, nil
}

// Relinearization says whether the keyset has a relinearization key.
func (e *Engine) Relinearization() bool { return e.Keys.Manifest.RelinearizationKey != nil }

// Cost is what an operation declares when kmsd attests its result: the
// factor by which it can multiply the standard deviation of its inputs'
// noise (at least 1) and how many key switches it did whose noise no
// later rescale divides (a key switch on a ciphertext at the square of
// the scale, before its rescale, adds next to nothing). kmsd bounds the
// result's noise from them (he.Kind.NoiseBound), and decryption floods in
// proportion; TestNoiseBoundHolds checks that the bound holds for every
// operation here.
type Cost struct {
	Amplification float64
	KeySwitches   int
}

// inputBound is the largest magnitude a value of this version can have
// and still decrypt: q0 / (2·scale). The polynomial's declared cost
// assumes its input within it (nothing smaller can be assumed of data the
// server does not see).
func (e *Engine) inputBound() float64 {
	return max(float64(e.params.Q()[0])/(2*e.params.DefaultScale().Float64()), 1)
}

// rotate rotates ct left by k slots, with the key for k or, failing that,
// as a sum of rotations by powers of two; each key switch is counted in
// *ks.
func (e *Engine) rotate(st *evalState, ct *rlwe.Ciphertext, k int, ks *int) (*rlwe.Ciphertext, error) {
	ev := st.eval
	k = ((k % e.slots) + e.slots) % e.slots
	if k == 0 {
		return ct.CopyNew(), nil
	}
	if st.galois[e.params.GaloisElement(k)] {
		*ks++
		return ev.RotateNew(ct, k)
	}
	for rest := k; rest != 0; rest &= rest - 1 {
		if p := 1 << bits.TrailingZeros(uint(rest)); !st.galois[e.params.GaloisElement(p)] {
			return nil, &MissingRotationError{Rotation: k, Key: p}
		}
	}
	out := ct
	for rest := k; rest != 0; rest &= rest - 1 {
		r, err := ev.RotateNew(out, 1<<bits.TrailingZeros(uint(rest)))
		if err != nil {
			return nil, err
		}
		*ks++
		out = r
	}
	return out, nil
}

// MatVec computes y = W·x for a ciphertext x whose first n slots hold the
// vector (n = the length of W's rows, the rest zero) and a plaintext m×n
// matrix W, with y in the first m slots. Method: x is replicated with
// period n' (n rounded up to a power of two) across the slots, then
// y_i = sum over k < n' of diag_k[i] * x[(i+k) mod n'] with diag_k[i] =
// W[i][(i+k) mod n'], evaluated baby-step giant-step: n'/b - 1 rotations
// by b and b - 1 rotations by 1, plus log2(slots/n') for the replication;
// one level. Rotations missing from the keyset are made from powers of
// two, or reported as a MissingRotationError.
func (e *Engine) MatVec(ctx context.Context, x *rlwe.Ciphertext, W [][]float64) (*rlwe.Ciphertext, Cost, error) {
	ks := 0
	ct, norm, err := e.matVec(ctx, x, W, &ks)
	if err != nil {
		return nil, Cost{}, err
	}
	return ct, Cost{Amplification: max(norm, 1), KeySwitches: ks}, nil
}

// matVec is MatVec; it also returns the amplification of the noise:
// the replication adds slots/n' copies of each slot's noise, and the
// diagonals weigh them, so that the noise's variance, averaged over all
// slots (which is what a coefficient of the error polynomial has), is
// multiplied by ||W||_F^2 / n'. Giant-step rotations act at the square of
// the scale, before the rescale, and are not counted.
func (e *Engine) matVec(ctx context.Context, x *rlwe.Ciphertext, W [][]float64, ks *int) (*rlwe.Ciphertext, float64, error) {
	m := len(W)
	if m == 0 || len(W[0]) == 0 {
		return nil, 0, errors.New("the matrix is empty")
	}
	n := len(W[0])
	frob := 0.0
	for i, row := range W {
		if len(row) != n {
			return nil, 0, fmt.Errorf("row %d has %d columns, row 0 has %d", i, len(row), n)
		}
		for _, w := range row {
			frob += w * w
		}
	}
	np := 1
	for np < n {
		np *= 2
	}
	if np > e.slots || m > e.slots {
		return nil, 0, fmt.Errorf("a %dx%d matrix does not fit %d slots", m, n, e.slots)
	}
	if err := amplificationCap(math.Sqrt(frob / float64(np))); err != nil {
		return nil, 0, err
	}
	if x.Level() < 1 {
		return nil, 0, errors.New("the ciphertext is at level 0: no level left for a multiplication")
	}
	logNp := bits.TrailingZeros(uint(np))
	b := 1 << (logNp / 2)
	G := np / b
	st, err := e.prepare(ctx, matVecRotations(np, b, G, e.slots))
	if err != nil {
		return nil, 0, err
	}
	ev := st.eval
	// Replicate x with period np.
	v := x.CopyNew()
	for p := np; p < e.slots; p *= 2 {
		r, err := e.rotate(st, v, p, ks)
		if err != nil {
			return nil, 0, err
		}
		if err := ev.Add(v, r, v); err != nil {
			return nil, 0, err
		}
	}
	baby := make([]*rlwe.Ciphertext, b)
	baby[0] = v
	for j := 1; j < b; j++ {
		r, err := e.rotate(st, baby[j-1], 1, ks)
		if err != nil {
			return nil, 0, err
		}
		baby[j] = r
	}
	var acc *rlwe.Ciphertext
	pd := make([]float64, e.slots)
	for g := G - 1; g >= 0; g-- {
		var u *rlwe.Ciphertext
		for j := 0; j < b; j++ {
			k := b*g + j
			// pdiag[t] = diag_k[(t - b*g) mod slots]; diag_k[i] = W[i][(i+k) mod np].
			nonzero := false
			for t := range pd {
				pd[t] = 0
			}
			for i := 0; i < m; i++ {
				c := (i + k) % np
				if c >= n || W[i][c] == 0 {
					continue
				}
				pd[(i+b*g)%e.slots] = W[i][c]
				nonzero = true
			}
			if !nonzero {
				continue
			}
			prod, err := ev.MulNew(baby[j], pd)
			if err != nil {
				return nil, 0, err
			}
			if u == nil {
				u = prod
			} else if err := ev.Add(u, prod, u); err != nil {
				return nil, 0, err
			}
		}
		switch {
		case acc == nil:
			acc = u
		default:
			r, err := e.rotate(st, acc, b, new(int))
			if err != nil {
				return nil, 0, err
			}
			if u != nil {
				if err := ev.Add(r, u, r); err != nil {
					return nil, 0, err
				}
			}
			acc = r
		}
	}
	if acc == nil { // an all-zero matrix
		// At the scale of the prime the rescale removes, as every other
		// product here (by the integer 0, the rescale left a scale below
		// 1, which kmsd would not attest).
		var err error
		if acc, err = e.mulConst(ev, x, 0); err != nil {
			return nil, 0, err
		}
	}
	if err := ev.Rescale(acc, acc); err != nil {
		return nil, 0, err
	}
	return acc, math.Sqrt(frob / float64(np)), nil
}

// matVecRotations are the rotations matVec makes for a period np, b baby
// steps and G giant steps: the replication's powers of two, 1 and b.
func matVecRotations(np, b, G, slots int) []int {
	var out []int
	for p := np; p < slots; p *= 2 {
		out = append(out, p)
	}
	if b > 1 {
		out = append(out, 1)
	}
	if G > 1 {
		out = append(out, b)
	}
	return out
}

// amplificationCap refuses, before anything is evaluated, an operation
// whose declared noise amplification kmsd would not attest.
func amplificationCap(amp float64) error {
	if !(amp <= wire.MaxAmplification) {
		return fmt.Errorf("the operation would multiply the noise of its input by %.3g; the cap is 2^40 (kmsd attests no more): scale the weights or coefficients down", amp)
	}
	return nil
}

// Linear is y = W·x + b, with y in the first m slots.
func (e *Engine) Linear(ctx context.Context, x *rlwe.Ciphertext, W [][]float64, bias []float64) (*rlwe.Ciphertext, Cost, error) {
	if bias != nil && len(bias) != len(W) {
		return nil, Cost{}, fmt.Errorf("bias has %d values, the weights %d rows", len(bias), len(W))
	}
	y, cost, err := e.MatVec(ctx, x, W)
	if err != nil {
		return nil, Cost{}, err
	}
	if bias != nil {
		if err := e.state.Load().eval.Add(y, bias, y); err != nil {
			return nil, Cost{}, err
		}
	}
	return y, cost, nil
}

// Polynomial evaluates c[0] + c[1]·x + ... + c[d]·x^d on every slot, by
// Horner's rule: d levels, d-1 relinearized multiplications.
func (e *Engine) Polynomial(x *rlwe.Ciphertext, c []float64) (*rlwe.Ciphertext, Cost, error) {
	d := len(c) - 1
	for d > 0 && c[d] == 0 {
		d--
	}
	if d < 1 {
		return nil, Cost{}, errors.New("give at least the coefficients of degree 0 and 1, the highest not 0")
	}
	if x.Level() < d {
		return nil, Cost{}, fmt.Errorf("a degree-%d polynomial needs %d levels; the ciphertext has %d left", d, d, x.Level())
	}
	if d > 1 && !e.Relinearization() {
		return nil, Cost{}, errors.New("this key version has no relinearization key, which a polynomial of degree 2 or more needs")
	}
	// d(r·x) = r·dx + x·dr: the noise grows by sum k·|c_k|·M^(k-1) for
	// inputs of magnitude at most M.
	amp := 0.0
	for k := 1; k <= d; k++ {
		amp += float64(k) * math.Abs(c[k]) * math.Pow(e.inputBound(), float64(k-1))
	}
	if err := amplificationCap(amp); err != nil {
		return nil, Cost{}, err
	}
	ev := e.state.Load().eval
	r, err := e.mulConst(ev, x, c[d])
	if err != nil {
		return nil, Cost{}, err
	}
	if err := ev.Rescale(r, r); err != nil {
		return nil, Cost{}, err
	}
	if err := ev.Add(r, c[d-1], r); err != nil {
		return nil, Cost{}, err
	}
	for i := d - 2; i >= 0; i-- {
		if err := ev.MulRelin(r, x, r); err != nil {
			return nil, Cost{}, err
		}
		if err := ev.Rescale(r, r); err != nil {
			return nil, Cost{}, err
		}
		if err := ev.Add(r, c[i], r); err != nil {
			return nil, Cost{}, err
		}
	}
	// The relinearizations act before their rescales.
	return r, Cost{Amplification: max(amp, 1)}, nil
}

// mulConst multiplies ct by the constant c in every slot, encoded at the
// scale of the prime the next rescale removes, so that the rescale brings
// the scale back (Lattigo multiplies by an integer constant at scale 1,
// after which a rescale would leave a scale below 1).
func (e *Engine) mulConst(ev *ckks.Evaluator, ct *rlwe.Ciphertext, c float64) (*rlwe.Ciphertext, error) {
	v := make([]float64, e.slots)
	for i := range v {
		v[i] = c
	}
	return ev.MulNew(ct, v)
}

// Aggregate sums ciphertexts of this version, or averages them (one level).
func (e *Engine) Aggregate(cts []*rlwe.Ciphertext, mean bool) (*rlwe.Ciphertext, Cost, error) {
	if len(cts) == 0 {
		return nil, Cost{}, errors.New("no ciphertexts")
	}
	ev := e.state.Load().eval
	// Lowest level first, so the sum is taken at the level all share.
	sort.SliceStable(cts, func(i, j int) bool { return cts[i].Level() < cts[j].Level() })
	sum := cts[0].CopyNew()
	for _, ct := range cts[1:] {
		if err := ev.Add(sum, ct, sum); err != nil {
			return nil, Cost{}, err
		}
	}
	// The inputs' noises add up (kmsd sums their variances); a mean
	// divides them.
	if !mean {
		return sum, Cost{Amplification: 1}, nil
	}
	if sum.Level() < 1 {
		return nil, Cost{}, errors.New("the ciphertexts are at level 0: no level left for the mean's multiplication")
	}
	sum, err := e.mulConst(ev, sum, 1/float64(len(cts)))
	if err != nil {
		return nil, Cost{}, err
	}
	if err := ev.Rescale(sum, sum); err != nil {
		return nil, Cost{}, err
	}
	return sum, Cost{Amplification: 1}, nil
}
