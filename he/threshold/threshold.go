// Package threshold is the cryptography of kmsd's threshold HE keys: n
// parties (kmsd nodes) generate a CKKS or BGV key jointly, so that no
// party ever holds the secret key, and any t of them decrypt together
// (Lattigo's multiparty protocols: collective public key, relinearization
// and Galois key generation, Shamir t-of-n sharing, public-key switching).
//
// The package is transport-free: each step takes and returns byte
// messages, and says which go to every party (broadcast) and which to
// one party alone (a Shamir share of a party's secret: the transport must
// keep it confidential and authenticated). What a party keeps is its
// Share, the one secret it seals in its HSM.
//
// Setup, for parties 1..n with threshold t and a common reference string
// (CRS) seed every party agrees on:
//
//  1. Round1: each party draws its additive secret s_i (in memory only),
//     broadcasts its public-key, relinearization (round 1) and Galois
//     key shares, and sends party j the Shamir share f_i(j) of s_i.
//  2. Anyone (kmsd: the coordinating node) sums the round-1 broadcasts
//     (Config.AggregateRound1): the sum is public, the size of one.
//  3. Round2: from that sum, each party answers its relinearization
//     round-2 share; they are summed too (Config.AggregateRound2).
//  4. Finish: from the two sums, each party computes the same public,
//     relinearization and Galois keys (the collective secret is s = Σ s_i),
//     and from the Shamir shares addressed to it its Share, Σ_i f_i(j), a
//     point of a degree t-1 polynomial whose value at 0 is s. s_i is
//     dropped.
//
// Decryption of a ciphertext ct for a requester with an ephemeral key pair
// (pk_r, sk_r): t parties each turn their Share into an additive share of s
// for that set of parties (Lagrange coefficients) and answer a public-key
// switching share of ct towards pk_r, flooded with noise of the given
// standard deviation; the requester combines the t answers into an
// encryption of the plaintext under pk_r and decrypts it with sk_r. No
// party and no relay sees the plaintext; fewer than t shares give nothing.
package threshold

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/multiparty"
	"github.com/tuneinsight/lattigo/v6/ring"
	"github.com/tuneinsight/lattigo/v6/ring/ringqp"
	"github.com/tuneinsight/lattigo/v6/utils/sampling"
)

// MaxParties bounds n.
const MaxParties = 16

// Config is what every party of one setup agrees on.
type Config struct {
	Params rlwe.Parameters
	// N parties, numbered 1..N (their Shamir points); T of them decrypt.
	N, T int
	// Self is this party's number.
	Self int
	// GaloisElements are the Galois keys to generate (sorted, unique);
	// Relinearization asks for the relinearization key.
	GaloisElements  []uint64
	Relinearization bool
	// CRS seeds the common reference string: the uniform halves of every
	// collective key. All parties must use the same; it need not be
	// secret, but no single party may choose it (kmsd derives it from the
	// protocol run's id and every party's contribution).
	CRS [32]byte
}

func (c *Config) check() error {
	switch {
	case c.N < 2 || c.N > MaxParties:
		return fmt.Errorf("threshold: %d parties; from 2 to %d", c.N, MaxParties)
	case c.T < 1 || c.T > c.N:
		return fmt.Errorf("threshold: threshold %d of %d parties", c.T, c.N)
	case c.Self < 1 || c.Self > c.N:
		return fmt.Errorf("threshold: party %d of 1..%d", c.Self, c.N)
	case c.Params.PCount() == 0 && (c.Relinearization || len(c.GaloisElements) > 0):
		return errors.New("threshold: evaluation keys need parameters with special primes (P)")
	case !slices.IsSorted(c.GaloisElements) || len(slices.Compact(slices.Clone(c.GaloisElements))) != len(c.GaloisElements):
		return errors.New("threshold: Galois elements must be sorted and unique")
	}
	return nil
}

// crps are the common reference polynomials of a setup, sampled from the
// CRS in a fixed order.
type crps struct {
	pk  multiparty.PublicKeyGenCRP
	rlk multiparty.RelinearizationKeyGenCRP
	gal []multiparty.GaloisKeyGenCRP
}

func sampleCRPs(c *Config) (*crps, error) {
	crs, err := sampling.NewKeyedPRNG(append([]byte("kmsd-threshold-crs-v1"), c.CRS[:]...))
	if err != nil {
		return nil, err
	}
	out := &crps{pk: multiparty.NewPublicKeyGenProtocol(c.Params).SampleCRP(crs)}
	if c.Relinearization {
		out.rlk = multiparty.NewRelinearizationKeyGenProtocol(c.Params).SampleCRP(crs)
	}
	gkg := multiparty.NewGaloisKeyGenProtocol(c.Params)
	for range c.GaloisElements {
		out.gal = append(out.gal, gkg.SampleCRP(crs))
	}
	return out, nil
}

// Setup is one party's state during a setup. It holds the party's
// additive secret until Finish.
type Setup struct {
	cfg   Config
	crps  *crps
	sk    *rlwe.SecretKey // s_i
	ephSk *rlwe.SecretKey // relinearization round 1's ephemeral secret
	// privateSelf is this party's Shamir share of its own secret.
	privateSelf []byte
}

// NewSetup starts a setup for cfg.Self.
func NewSetup(cfg Config) (*Setup, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	cfg.GaloisElements = slices.Clone(cfg.GaloisElements)
	c, err := sampleCRPs(&cfg)
	if err != nil {
		return nil, err
	}
	return &Setup{cfg: cfg, crps: c, sk: rlwe.NewKeyGenerator(cfg.Params).GenSecretKeyNew()}, nil
}

// Round1 returns this party's broadcast (its public-key, relinearization
// round-1 and Galois key shares) and, for every other party j, the Shamir
// share f_self(j) of this party's secret: private[j] goes to party j alone.
func (s *Setup) Round1() (broadcast []byte, private map[int][]byte, err error) {
	p := s.cfg.Params
	var w msgWriter
	ckg := multiparty.NewPublicKeyGenProtocol(p)
	pkShare := ckg.AllocateShare()
	ckg.GenShare(s.sk, s.crps.pk, &pkShare)
	w.put(pkShare)
	if s.cfg.Relinearization {
		rkg := multiparty.NewRelinearizationKeyGenProtocol(p)
		eph, r1, _ := rkg.AllocateShare()
		rkg.GenShareRoundOne(s.sk, s.crps.rlk, eph, &r1)
		s.ephSk = eph
		w.put(r1)
	}
	gkg := multiparty.NewGaloisKeyGenProtocol(p)
	for i, g := range s.cfg.GaloisElements {
		sh := gkg.AllocateShare()
		if err := gkg.GenShare(s.sk, g, s.crps.gal[i], &sh); err != nil {
			return nil, nil, err
		}
		w.put(sh)
	}
	if w.err != nil {
		return nil, nil, w.err
	}
	thr := multiparty.NewThresholdizer(p)
	poly, err := thr.GenShamirPolynomial(s.cfg.T, s.sk)
	if err != nil {
		return nil, nil, err
	}
	private = map[int][]byte{}
	for j := 1; j <= s.cfg.N; j++ {
		sh := thr.AllocateThresholdSecretShare()
		thr.GenShamirSecretShare(multiparty.ShamirPublicPoint(j), poly, &sh)
		b, err := sh.MarshalBinary()
		if err != nil {
			return nil, nil, err
		}
		if j == s.cfg.Self {
			s.privateSelf = b
			continue
		}
		private[j] = b
	}
	return w.bytes(), private, nil
}

// round1 is a decoded round-1 broadcast.
type round1 struct {
	pk  multiparty.PublicKeyGenShare
	rlk multiparty.RelinearizationKeyGenShare
	gal []multiparty.GaloisKeyGenShare
}

func decodeRound1(c *Config, b []byte) (*round1, error) {
	p := c.Params
	r := msgReader{b: b, n: p.N()}
	out := &round1{pk: multiparty.NewPublicKeyGenProtocol(p).AllocateShare()}
	r.get(&out.pk)
	if c.Relinearization {
		_, out.rlk, _ = multiparty.NewRelinearizationKeyGenProtocol(p).AllocateShare()
		r.get(&out.rlk)
	}
	gkg := multiparty.NewGaloisKeyGenProtocol(p)
	for _, g := range c.GaloisElements {
		sh := gkg.AllocateShare()
		sh.GaloisElement = g
		r.get(&sh)
		out.gal = append(out.gal, sh)
	}
	return out, r.done()
}

// AggregateRound1 sums the round-1 broadcasts of all N parties (in any
// order): the public sum every party's Round2 and Finish take. It needs no
// secret; the parties' own Config (any Self) computes it.
func (c Config) AggregateRound1(all [][]byte) ([]byte, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	if len(all) != c.N {
		return nil, fmt.Errorf("threshold: %d round-1 messages, want one from each of %d parties", len(all), c.N)
	}
	var agg *round1
	for i, b := range all {
		r, err := decodeRound1(&c, b)
		if err != nil {
			return nil, fmt.Errorf("threshold: round-1 message %d: %w", i, err)
		}
		if agg == nil {
			agg = r
			continue
		}
		if err := agg.add(&c, r); err != nil {
			return nil, err
		}
	}
	return agg.encode(&c)
}

// AggregateRound2 sums the round-2 shares of all N parties; nil when the
// setup makes no relinearization key.
func (c Config) AggregateRound2(all [][]byte) ([]byte, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	if !c.Relinearization {
		return nil, nil
	}
	if len(all) != c.N {
		return nil, fmt.Errorf("threshold: %d round-2 messages, want one from each of %d parties", len(all), c.N)
	}
	rkg := multiparty.NewRelinearizationKeyGenProtocol(c.Params)
	var sum multiparty.RelinearizationKeyGenShare
	for i, b := range all {
		_, _, r2 := rkg.AllocateShare()
		if err := decodeExact(c.Params.N(), b, &r2); err != nil {
			return nil, fmt.Errorf("threshold: round-2 message %d: %w", i, err)
		}
		if i == 0 {
			sum = r2
		} else {
			rkg.AggregateShares(sum, r2, &sum)
		}
	}
	return sum.MarshalBinary()
}

// add sums r into a.
func (a *round1) add(c *Config, r *round1) error {
	p := c.Params
	multiparty.NewPublicKeyGenProtocol(p).AggregateShares(a.pk, r.pk, &a.pk)
	if c.Relinearization {
		multiparty.NewRelinearizationKeyGenProtocol(p).AggregateShares(a.rlk, r.rlk, &a.rlk)
	}
	gkg := multiparty.NewGaloisKeyGenProtocol(p)
	for i := range a.gal {
		if err := gkg.AggregateShares(a.gal[i], r.gal[i], &a.gal[i]); err != nil {
			return err
		}
	}
	return nil
}

func (a *round1) encode(c *Config) ([]byte, error) {
	var w msgWriter
	w.put(a.pk)
	if c.Relinearization {
		w.put(a.rlk)
	}
	for _, g := range a.gal {
		w.put(g)
	}
	return w.bytes(), w.err
}

// Round2 returns this party's relinearization round-2 share, from the
// sum of the round-1 broadcasts (AggregateRound1); nil when the setup
// makes no relinearization key.
func (s *Setup) Round2(agg1 []byte) ([]byte, error) {
	if !s.cfg.Relinearization {
		return nil, nil
	}
	agg, err := decodeRound1(&s.cfg, agg1)
	if err != nil {
		return nil, fmt.Errorf("threshold: round-1 sum: %w", err)
	}
	rkg := multiparty.NewRelinearizationKeyGenProtocol(s.cfg.Params)
	_, _, r2 := rkg.AllocateShare()
	rkg.GenShareRoundTwo(s.ephSk, s.sk, agg.rlk, &r2)
	return r2.MarshalBinary()
}

// Keys are a threshold key's public and evaluation keys, the same at
// every party.
type Keys struct {
	PublicKey       *rlwe.PublicKey
	Relinearization *rlwe.RelinearizationKey
	Galois          []*rlwe.GaloisKey
}

// Finish computes the collective keys from the sums of the round-1 and
// round-2 messages (AggregateRound1, AggregateRound2) and this party's
// Share from the Shamir shares the other parties sent it (private[j] from
// party j), and drops the party's additive secret.
func (s *Setup) Finish(agg1, agg2 []byte, private map[int][]byte) (*Keys, *Share, error) {
	p := s.cfg.Params
	agg, err := decodeRound1(&s.cfg, agg1)
	if err != nil {
		return nil, nil, fmt.Errorf("threshold: round-1 sum: %w", err)
	}
	keys := &Keys{PublicKey: rlwe.NewPublicKey(p)}
	multiparty.NewPublicKeyGenProtocol(p).GenPublicKey(agg.pk, s.crps.pk, keys.PublicKey)
	if s.cfg.Relinearization {
		rkg := multiparty.NewRelinearizationKeyGenProtocol(p)
		_, _, sum := rkg.AllocateShare()
		if err := decodeExact(p.N(), agg2, &sum); err != nil {
			return nil, nil, fmt.Errorf("threshold: round-2 sum: %w", err)
		}
		keys.Relinearization = rlwe.NewRelinearizationKey(p)
		rkg.GenRelinearizationKey(agg.rlk, sum, keys.Relinearization)
	}
	gkg := multiparty.NewGaloisKeyGenProtocol(p)
	for i := range s.cfg.GaloisElements {
		gk := rlwe.NewGaloisKey(p)
		if err := gkg.GenGaloisKey(agg.gal[i], s.crps.gal[i], gk); err != nil {
			return nil, nil, err
		}
		keys.Galois = append(keys.Galois, gk)
	}
	// This party's Share: the sum of the Shamir shares of every party's
	// secret at this party's point.
	if len(private) != s.cfg.N-1 {
		return nil, nil, fmt.Errorf("threshold: %d Shamir shares received, want one from each of the %d other parties", len(private), s.cfg.N-1)
	}
	thr := multiparty.NewThresholdizer(p)
	share := thr.AllocateThresholdSecretShare()
	if err := decodeExact(p.N(), s.privateSelf, &share); err != nil {
		return nil, nil, err
	}
	for j := 1; j <= s.cfg.N; j++ {
		if j == s.cfg.Self {
			continue
		}
		b, ok := private[j]
		if !ok {
			return nil, nil, fmt.Errorf("threshold: no Shamir share from party %d", j)
		}
		sh := thr.AllocateThresholdSecretShare()
		if err := decodeExact(p.N(), b, &sh); err != nil || sh.LevelQ() != share.LevelQ() || sh.LevelP() != share.LevelP() {
			return nil, nil, fmt.Errorf("threshold: the Shamir share from party %d is malformed", j)
		}
		if err := thr.AggregateShares(share, sh, &share); err != nil {
			return nil, nil, err
		}
	}
	s.wipe()
	return keys, &Share{Point: s.cfg.Self, N: s.cfg.N, T: s.cfg.T, value: share}, nil
}

// wipe drops the party's additive secrets.
func (s *Setup) wipe() {
	for _, sk := range []*rlwe.SecretKey{s.sk, s.ephSk} {
		if sk != nil {
			zeroQP(sk.Value)
		}
	}
	clear(s.privateSelf)
	s.sk, s.ephSk, s.privateSelf = nil, nil, nil
}

// Share is a party's threshold secret share: the one secret a party keeps
// (sealed in its HSM), useless without t-1 others.
type Share struct {
	Point, N, T int
	value       multiparty.ShamirSecretShare
}

// MarshalBinary encodes the share (for sealing: it is secret).
func (sh *Share) MarshalBinary() ([]byte, error) {
	v, err := sh.value.MarshalBinary()
	if err != nil {
		return nil, err
	}
	out := binary.BigEndian.AppendUint16(nil, uint16(sh.Point))
	out = binary.BigEndian.AppendUint16(out, uint16(sh.N))
	out = binary.BigEndian.AppendUint16(out, uint16(sh.T))
	return append(out, v...), nil
}

// UnmarshalShare decodes a share for parameters p.
func UnmarshalShare(p rlwe.Parameters, b []byte) (*Share, error) {
	if len(b) < 6 {
		return nil, errors.New("threshold: share too short")
	}
	sh := &Share{Point: int(binary.BigEndian.Uint16(b)), N: int(binary.BigEndian.Uint16(b[2:])), T: int(binary.BigEndian.Uint16(b[4:]))}
	if sh.N < 2 || sh.N > MaxParties || sh.T < 1 || sh.T > sh.N || sh.Point < 1 || sh.Point > sh.N {
		return nil, errors.New("threshold: malformed share header")
	}
	sh.value = multiparty.NewThresholdizer(p).AllocateThresholdSecretShare()
	if err := decodeExact(p.N(), b[6:], &sh.value); err != nil {
		return nil, fmt.Errorf("threshold: share: %w", err)
	}
	return sh, nil
}

// Wipe clears the share's value.
func (sh *Share) Wipe() { zeroQP(sh.value.Poly) }

// zeroQP overwrites a secret polynomial.
func zeroQP(p ringqp.Poly) {
	p.Q.Zero()
	if p.P.Coeffs != nil {
		p.P.Zero()
	}
}

// checkActive checks a set of decrypting parties: exactly T distinct
// points of 1..N, ascending, this share's among them.
func (sh *Share) checkActive(active []int) error {
	if len(active) != sh.T {
		return fmt.Errorf("threshold: %d decrypting parties; exactly %d (the threshold) take part", len(active), sh.T)
	}
	if !slices.IsSorted(active) || len(slices.Compact(slices.Clone(active))) != len(active) {
		return errors.New("threshold: the decrypting parties must be listed ascending, once each")
	}
	for _, a := range active {
		if a < 1 || a > sh.N {
			return fmt.Errorf("threshold: party %d of 1..%d", a, sh.N)
		}
	}
	if !slices.Contains(active, sh.Point) {
		return fmt.Errorf("threshold: party %d is not among the decrypting parties %v", sh.Point, active)
	}
	return nil
}

// additive turns the share into this party's additive share of the secret
// for the decrypting parties active.
func (sh *Share) additive(p rlwe.Parameters, active []int) (*rlwe.SecretKey, error) {
	if err := sh.checkActive(active); err != nil {
		return nil, err
	}
	var points, all []multiparty.ShamirPublicPoint
	for _, a := range active {
		points = append(points, multiparty.ShamirPublicPoint(a))
	}
	for j := 1; j <= sh.N; j++ {
		all = append(all, multiparty.ShamirPublicPoint(j))
	}
	cmb := multiparty.NewCombiner(p, multiparty.ShamirPublicPoint(sh.Point), all, sh.T)
	sk := rlwe.NewSecretKey(p)
	if err := cmb.GenAdditiveShare(points, multiparty.ShamirPublicPoint(sh.Point), sh.value, sk); err != nil {
		return nil, err
	}
	return sk, nil
}

// PartialDecrypt is this party's answer to a decryption of ct by the
// decrypting parties active (T of them, ascending) for the requester's
// public key target: a public-key switching share of ct towards target,
// flooded with Gaussian noise of standard deviation 2^floodLog2 (sized by
// the caller from ct's noise bound, as for kmsd's own decryptions).
func PartialDecrypt(p rlwe.Parameters, sh *Share, active []int, ct *rlwe.Ciphertext, target *rlwe.PublicKey, floodLog2 float64) ([]byte, error) {
	if !(floodLog2 >= 0 && floodLog2 <= 60) {
		return nil, fmt.Errorf("threshold: flooding of 2^%v", floodLog2)
	}
	sk, err := sh.additive(p, active)
	if err != nil {
		return nil, err
	}
	defer zeroQP(sk.Value)
	sigma := math.Exp2(floodLog2)
	pcks, err := multiparty.NewPublicKeySwitchProtocol(p, ring.DiscreteGaussian{Sigma: sigma, Bound: 6 * sigma})
	if err != nil {
		return nil, err
	}
	share := pcks.AllocateShare(ct.Level())
	pcks.GenShare(sk, target, ct, &share)
	return share.MarshalBinary()
}

// Combine is the requester's side: the T partial decryptions of ct
// (answered for target) summed into ct re-encrypted under target, which
// the requester decrypts with its secret key.
func Combine(p rlwe.Parameters, ct *rlwe.Ciphertext, partials [][]byte) (*rlwe.Ciphertext, error) {
	if len(partials) == 0 {
		return nil, errors.New("threshold: no partial decryption")
	}
	pcks, err := multiparty.NewPublicKeySwitchProtocol(p, ring.DiscreteGaussian{Sigma: 1, Bound: 6})
	if err != nil {
		return nil, err
	}
	var sum multiparty.PublicKeySwitchShare
	for i, b := range partials {
		sh := pcks.AllocateShare(ct.Level())
		if err := decodeExact(p.N(), b, &sh); err != nil || sh.Level() != ct.Level() {
			return nil, fmt.Errorf("threshold: partial decryption %d is malformed", i)
		}
		if i == 0 {
			sum = sh
		} else if err := pcks.AggregateShares(sum, sh, &sum); err != nil {
			return nil, err
		}
	}
	out := rlwe.NewCiphertext(p, 1, ct.Level())
	pcks.KeySwitch(ct, sum, out)
	return out, nil
}

// msgWriter concatenates length-prefixed encodings.
type msgWriter struct {
	buf bytes.Buffer
	err error
}

func (w *msgWriter) put(m interface{ MarshalBinary() ([]byte, error) }) {
	if w.err != nil {
		return
	}
	b, err := m.MarshalBinary()
	if err != nil {
		w.err = err
		return
	}
	w.buf.Write(binary.BigEndian.AppendUint64(nil, uint64(len(b))))
	w.buf.Write(b)
}

func (w *msgWriter) bytes() []byte { return w.buf.Bytes() }

// msgReader reads what msgWriter wrote.
type msgReader struct {
	b   []byte
	n   int // the ring degree
	err error
}

func (r *msgReader) get(m sized) {
	if r.err != nil {
		return
	}
	if len(r.b) < 8 {
		r.err = io.ErrUnexpectedEOF
		return
	}
	n := binary.BigEndian.Uint64(r.b)
	if n > uint64(len(r.b)-8) {
		r.err = io.ErrUnexpectedEOF
		return
	}
	r.err = decodeExact(r.n, r.b[8:8+n], m)
	r.b = r.b[8+n:]
}

// sized is a Lattigo object allocated for the parameters: its encoding
// (BinarySize bytes, MarshalBinary's layout) is what a message must be.
type sized interface {
	BinarySize() int
	MarshalBinary() ([]byte, error)
	ReadFrom(io.Reader) (int64, error)
}

// decodeExact decodes b into m, an object allocated for the parameters
// (ring degree n), refusing any other length first and any header other
// than m's own: Lattigo's decoders do not survive a truncated input (a
// stack overflow) nor a vector length of 2^43 in a message of the right
// size (an allocation of what the header says: fatal out of memory),
// neither of which a recover catches. Lattigo reads every header (vector
// lengths, flags, metadata, Galois elements) with a short read and the
// coefficients a limb (n words) at a time: every read but a limb's must
// give the bytes of m's own encoding at the same offset.
func decodeExact(n int, b []byte, m sized) error {
	if len(b) != m.BinarySize() {
		return fmt.Errorf("%d bytes, want %d", len(b), m.BinarySize())
	}
	tmpl, err := m.MarshalBinary()
	if err != nil {
		return err
	}
	if len(tmpl) != len(b) {
		return fmt.Errorf("%d bytes, want %d", len(b), len(tmpl))
	}
	g := &guardedReader{b: b, tmpl: tmpl, limb: 8 * n}
	if _, err := m.ReadFrom(g); err != nil {
		return err
	}
	if g.err != nil {
		return g.err
	}
	if g.off != len(b) {
		return errors.New("trailing bytes")
	}
	return nil
}

// errHeader is a message whose structure is not its parameters'.
var errHeader = errors.New("a header differs from the parameters' layout")

// guardedReader is the buffer.Reader decodeExact gives Lattigo.
type guardedReader struct {
	b, tmpl []byte
	off     int
	limb    int
	err     error
}

func (g *guardedReader) Size() int { return len(g.b) }

func (g *guardedReader) Peek(k int) ([]byte, error) {
	if g.err != nil {
		return nil, g.err
	}
	if k < 0 || k > len(g.b)-g.off {
		g.err = io.ErrUnexpectedEOF
		return nil, g.err
	}
	s := g.b[g.off : g.off+k]
	if k != g.limb && !bytes.Equal(s, g.tmpl[g.off:g.off+k]) {
		g.err = errHeader
		return nil, g.err
	}
	return s, nil
}

func (g *guardedReader) Discard(k int) (int, error) {
	if g.err != nil {
		return 0, g.err
	}
	if k < 0 || k > len(g.b)-g.off {
		g.err = io.ErrUnexpectedEOF
		return 0, g.err
	}
	g.off += k
	return k, nil
}

func (g *guardedReader) Read(p []byte) (int, error) {
	s, err := g.Peek(len(p))
	if err != nil {
		return 0, err
	}
	copy(p, s)
	return g.Discard(len(p))
}

func (r *msgReader) done() error {
	if r.err == nil && len(r.b) != 0 {
		return errors.New("trailing bytes")
	}
	return r.err
}

// EncodeTarget encodes a requester's public key for a decryption request
// in a form a party decodes without Lattigo's decoder: the coefficients of
// its two polynomials, each Q limbs then P limbs of N little-endian
// uint64s, as Lattigo holds them (NTT, Montgomery).
func EncodeTarget(pk *rlwe.PublicKey) []byte {
	var out []byte
	for _, v := range pk.Value {
		for _, poly := range []ring.Poly{v.Q, v.P} {
			for _, limb := range poly.Coeffs {
				for _, c := range limb {
					out = binary.LittleEndian.AppendUint64(out, c)
				}
			}
		}
	}
	return out
}

// DecodeTarget is EncodeTarget's inverse for parameters p: exactly the
// size they give, every coefficient below its limb's modulus.
func DecodeTarget(p rlwe.Parameters, b []byte) (*rlwe.PublicKey, error) {
	pk := rlwe.NewPublicKey(p)
	n := p.N()
	want := 2 * (p.QCount() + p.PCount()) * n * 8
	if len(b) != want {
		return nil, fmt.Errorf("threshold: the requester's public key is %d bytes; for these parameters %d", len(b), want)
	}
	moduli := append(slices.Clone(p.Q()), p.P()...)
	off := 0
	for _, v := range pk.Value {
		for pi, poly := range []ring.Poly{v.Q, v.P} {
			for li, limb := range poly.Coeffs {
				q := moduli[li]
				if pi == 1 {
					q = moduli[p.QCount()+li]
				}
				for i := range limb {
					c := binary.LittleEndian.Uint64(b[off:])
					if c >= q {
						return nil, errors.New("threshold: the requester's public key has a coefficient out of range")
					}
					limb[i] = c
					off += 8
				}
			}
		}
	}
	return pk, nil
}
