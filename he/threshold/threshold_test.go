package threshold

import (
	"bytes"
	"crypto/rand"
	"math"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
	"github.com/tuneinsight/lattigo/v6/schemes/bgv"
	"github.com/tuneinsight/lattigo/v6/schemes/ckks"
)

// testParams are the parameters of kmsd's presets (he's, which this
// package's tests cannot import: he imports this package).
type testParams struct {
	CKKS ckks.Parameters
	BGV  bgv.Parameters
}

func preset(t testing.TB, name string) testParams {
	t.Helper()
	var out testParams
	var err error
	switch name {
	case "ckks-logn13":
		out.CKKS, err = ckks.NewParametersFromLiteral(ckks.ParametersLiteral{LogN: 13, LogQ: []int{58, 50, 50}, LogP: []int{58}, LogDefaultScale: 50})
	case "ckks-logn14":
		out.CKKS, err = ckks.NewParametersFromLiteral(ckks.ParametersLiteral{LogN: 14, LogQ: []int{60, 55, 55, 55, 55}, LogP: []int{60, 60}, LogDefaultScale: 55})
	case "ckks-logn15":
		out.CKKS, err = ckks.NewParametersFromLiteral(ckks.ParametersLiteral{LogN: 15, LogQ: []int{60, 55, 55, 55, 55, 55, 55, 55, 55, 55, 55, 55}, LogP: []int{60, 60, 60}, LogDefaultScale: 55})
	case "bgv-logn13":
		out.BGV, err = bgv.NewParametersFromLiteral(bgv.ParametersLiteral{LogN: 13, LogQ: []int{54, 54, 54}, LogP: []int{55}, PlaintextModulus: 65537})
	default:
		t.Fatalf("no preset %s", name)
	}
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// transcript is what the parties of one setup sent.
type transcript struct {
	round1, round2 map[int][]byte
	private        map[int]map[int][]byte // private[to][from]
	bytesSent      map[int]int            // by party: its round messages to the coordinator and its Shamir shares
	aggBytes       int                    // what the coordinator sends each party (the sums)
}

// runSetup runs a setup among n parties (threshold tt) in process, every
// message passed as bytes, and returns each party's keys and share.
func runSetup(t testing.TB, p rlwe.Parameters, n, tt int, gal []uint64, relin bool) ([]*Keys, []*Share, *transcript) {
	t.Helper()
	var crs [32]byte
	rand.Read(crs[:])
	setups := make([]*Setup, n+1)
	tr := &transcript{round1: map[int][]byte{}, round2: map[int][]byte{}, private: map[int]map[int][]byte{}, bytesSent: map[int]int{}}
	for j := 1; j <= n; j++ {
		s, err := NewSetup(Config{Params: p, N: n, T: tt, Self: j, GaloisElements: gal, Relinearization: relin, CRS: crs})
		if err != nil {
			t.Fatal(err)
		}
		setups[j] = s
		tr.private[j] = map[int][]byte{}
	}
	for j := 1; j <= n; j++ {
		b, priv, err := setups[j].Round1()
		if err != nil {
			t.Fatal(err)
		}
		tr.round1[j] = b
		tr.bytesSent[j] += len(b)
		for to, m := range priv {
			tr.private[to][j] = m
			tr.bytesSent[j] += len(m)
		}
	}
	cfg := setups[1].cfg
	var r1 [][]byte
	for j := 1; j <= n; j++ {
		r1 = append(r1, tr.round1[j])
	}
	agg1, err := cfg.AggregateRound1(r1)
	if err != nil {
		t.Fatal(err)
	}
	var r2 [][]byte
	for j := 1; j <= n; j++ {
		b, err := setups[j].Round2(agg1)
		if err != nil {
			t.Fatal(err)
		}
		tr.round2[j] = b
		r2 = append(r2, b)
		tr.bytesSent[j] += len(b)
	}
	agg2, err := cfg.AggregateRound2(r2)
	if err != nil {
		t.Fatal(err)
	}
	tr.aggBytes = len(agg1) + len(agg1) + len(agg2) // round 2 and finish take agg1, finish agg2
	keys := make([]*Keys, n+1)
	shares := make([]*Share, n+1)
	for j := 1; j <= n; j++ {
		k, sh, err := setups[j].Finish(agg1, agg2, tr.private[j])
		if err != nil {
			t.Fatal(err)
		}
		keys[j], shares[j] = k, sh
	}
	return keys, shares, tr
}

// decryptWith has the parties active answer for a fresh requester key and
// returns the requester's decryption.
func decryptWith(t testing.TB, p rlwe.Parameters, shares []*Share, active []int, ct *rlwe.Ciphertext, floodLog2 float64) (*rlwe.Plaintext, error) {
	t.Helper()
	kg := rlwe.NewKeyGenerator(p)
	skR, pkR := kg.GenKeyPairNew()
	var partials [][]byte
	for _, a := range active {
		b, err := PartialDecrypt(p, shares[a], active, ct, pkR, floodLog2)
		if err != nil {
			return nil, err
		}
		partials = append(partials, b)
	}
	out, err := Combine(p, ct, partials)
	if err != nil {
		return nil, err
	}
	return rlwe.NewDecryptor(p, skR).DecryptNew(out), nil
}

// TestThresholdCKKS: three parties (t = 2) make a CKKS key; every party
// computes the same public, relinearization and Galois keys; two
// parties' ciphertexts are summed, squared, relinearized and rotated
// with them; any two parties decrypt the result for a requester within
// CKKS precision after flooding; one party alone cannot.
func TestThresholdCKKS(t *testing.T) {
	p := preset(t, "ckks-logn13").CKKS
	gal := []uint64{p.GaloisElementForRotation(1)}
	keys, shares, tr := runSetup(t, p.Parameters, 3, 2, gal, true)
	for j := 2; j <= 3; j++ {
		a, _ := keys[1].PublicKey.MarshalBinary()
		b, _ := keys[j].PublicKey.MarshalBinary()
		r1, _ := keys[1].Relinearization.MarshalBinary()
		rj, _ := keys[j].Relinearization.MarshalBinary()
		g1, _ := keys[1].Galois[0].MarshalBinary()
		gj, _ := keys[j].Galois[0].MarshalBinary()
		if !bytes.Equal(a, b) || !bytes.Equal(r1, rj) || !bytes.Equal(g1, gj) {
			t.Fatalf("party %d computed other keys than party 1", j)
		}
	}
	t.Logf("setup: %d, %d, %d bytes sent by parties 1..3; %d to each from the coordinator", tr.bytesSent[1], tr.bytesSent[2], tr.bytesSent[3], tr.aggBytes)
	enc := ckks.NewEncoder(p)
	encrypt := func(v []float64) *rlwe.Ciphertext {
		pt := ckks.NewPlaintext(p, p.MaxLevel())
		if err := enc.Encode(v, pt); err != nil {
			t.Fatal(err)
		}
		ct, err := rlwe.NewEncryptor(p, keys[1].PublicKey).EncryptNew(pt)
		if err != nil {
			t.Fatal(err)
		}
		return ct
	}
	slots := p.MaxSlots()
	a, b := make([]float64, slots), make([]float64, slots)
	for i := range a {
		a[i], b[i] = float64(i%7)/8, float64(i%5)/8-0.25
	}
	// (a+b)^2 rotated by 1.
	ev := ckks.NewEvaluator(p, rlwe.NewMemEvaluationKeySet(keys[2].Relinearization, keys[3].Galois...))
	sum, _ := ev.AddNew(encrypt(a), encrypt(b))
	sq, err := ev.MulRelinNew(sum, sum)
	if err != nil {
		t.Fatal(err)
	}
	if err := ev.Rescale(sq, sq); err != nil {
		t.Fatal(err)
	}
	res, err := ev.RotateNew(sq, 1)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]float64, slots)
	for i := range want {
		x := a[(i+1)%slots] + b[(i+1)%slots]
		want[i] = x * x
	}
	for _, active := range [][]int{{1, 2}, {1, 3}, {2, 3}} {
		pt, err := decryptWith(t, p.Parameters, shares, active, res, 30)
		if err != nil {
			t.Fatal(err)
		}
		got := make([]float64, slots)
		if err := enc.Decode(pt, got); err != nil {
			t.Fatal(err)
		}
		worst := 0.0
		for i := range got {
			worst = math.Max(worst, math.Abs(got[i]-want[i]))
		}
		t.Logf("parties %v: largest error %.2g", active, worst)
		if worst > 1e-3 {
			t.Fatalf("parties %v: largest error %g", active, worst)
		}
	}
	// One party is not enough: refused, and its share used as it stands,
	// alone, decrypts to noise.
	if _, err := decryptWith(t, p.Parameters, shares, []int{1}, res, 30); err == nil {
		t.Fatal("one party decrypted alone")
	}
	if _, err := decryptWith(t, p.Parameters, shares, []int{1, 1}, res, 30); err == nil {
		t.Fatal("one party counted twice")
	}
}

// TestOneShareAndItsTranscriptCannotDecrypt: party 1's share, everything
// it received during the setup (every broadcast, the Shamir shares sent
// to it) and the ciphertext do not decrypt: the attempts an attacker
// holding one node would make (the share as the secret key, the share
// weighted as for each decrypting pair, the share with a guessed second
// share) all give noise.
func TestOneShareAndItsTranscriptCannotDecrypt(t *testing.T) {
	p := preset(t, "ckks-logn13").CKKS
	keys, shares, tr := runSetup(t, p.Parameters, 3, 2, nil, false)
	enc := ckks.NewEncoder(p)
	vals := make([]float64, p.MaxSlots())
	for i := range vals {
		vals[i] = 0.5
	}
	pt := ckks.NewPlaintext(p, p.MaxLevel())
	enc.Encode(vals, pt)
	ct, _ := rlwe.NewEncryptor(p, keys[1].PublicKey).EncryptNew(pt)
	decodeErr := func(sk *rlwe.SecretKey) float64 {
		got := make([]float64, p.MaxSlots())
		enc.Decode(rlwe.NewDecryptor(p, sk).DecryptNew(ct), got)
		worst := 0.0
		for i := range got {
			worst = math.Max(worst, math.Abs(got[i]-vals[i]))
		}
		return worst
	}
	own := shares[1]
	sk := rlwe.NewSecretKey(p)
	sk.Value.Q.Copy(own.value.Q)
	sk.Value.P.Copy(own.value.P)
	attempts := map[string]*rlwe.SecretKey{"the share as the secret key": sk}
	for _, active := range [][]int{{1, 2}, {1, 3}} {
		ask, err := own.additive(p.Parameters, active)
		if err != nil {
			t.Fatal(err)
		}
		attempts["the share weighted for parties "+string(rune('0'+active[0]))+","+string(rune('0'+active[1]))] = ask
	}
	// The Shamir shares party 1 received, each alone as a key (they are
	// points of the other parties' secrets' polynomials).
	for from, b := range tr.private[1] {
		sh, err := UnmarshalShare(p.Parameters, append([]byte{0, 1, 0, 3, 0, 2}, b...))
		if err != nil {
			t.Fatal(err)
		}
		k := rlwe.NewSecretKey(p)
		k.Value.Q.Copy(sh.value.Q)
		k.Value.P.Copy(sh.value.P)
		attempts["the Shamir share from party "+string(rune('0'+from))] = k
	}
	for what, k := range attempts {
		if e := decodeErr(k); e < 1e3 {
			t.Errorf("%s decrypts (largest error %g)", what, e)
		}
	}
	// And the two real shares do.
	pt2, err := decryptWith(t, p.Parameters, shares, []int{1, 2}, ct, 30)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]float64, p.MaxSlots())
	enc.Decode(pt2, got)
	if math.Abs(got[0]-0.5) > 1e-3 {
		t.Fatalf("two shares: %f", got[0])
	}
}

// TestThresholdBGV: BGV decrypts exactly.
func TestThresholdBGV(t *testing.T) {
	p := preset(t, "bgv-logn13").BGV
	keys, shares, _ := runSetup(t, p.Parameters, 3, 2, nil, true)
	enc := bgv.NewEncoder(p)
	vals := make([]uint64, p.MaxSlots())
	for i := range vals {
		vals[i] = uint64(i*13) % p.PlaintextModulus()
	}
	pt := bgv.NewPlaintext(p, p.MaxLevel())
	enc.Encode(vals, pt)
	ct, _ := rlwe.NewEncryptor(p, keys[3].PublicKey).EncryptNew(pt)
	ev := bgv.NewEvaluator(p, rlwe.NewMemEvaluationKeySet(keys[1].Relinearization))
	sq, err := ev.MulRelinNew(ct, ct)
	if err != nil {
		t.Fatal(err)
	}
	out, err := decryptWith(t, p.Parameters, shares, []int{2, 3}, sq, 20)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]uint64, p.MaxSlots())
	if err := enc.Decode(out, got); err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if want := vals[i] * vals[i] % p.PlaintextModulus(); got[i] != want {
			t.Fatalf("slot %d: %d, want %d", i, got[i], want)
		}
	}
}

// TestShareRoundTrip: a share survives its encoding (for sealing) and a
// malformed one is refused.
func TestShareRoundTrip(t *testing.T) {
	p := preset(t, "ckks-logn13").CKKS.Parameters
	_, shares, _ := runSetup(t, p, 2, 2, nil, false)
	b, err := shares[2].MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	back, err := UnmarshalShare(p, b)
	if err != nil || back.Point != 2 || back.N != 2 || back.T != 2 || !back.value.Equal(&shares[2].value.Poly) {
		t.Fatalf("round trip: %v", err)
	}
	for _, bad := range [][]byte{nil, b[:5], append([]byte{0, 3}, b[2:]...), append([]byte{0, 1, 0, 2, 0, 3}, b[6:]...), b[:len(b)-1]} {
		if _, err := UnmarshalShare(p, bad); err == nil {
			t.Errorf("a malformed share was accepted (%d bytes)", len(bad))
		}
	}
}

// TestSetupRefusals: a party refuses incomplete or inconsistent rounds.
func TestSetupRefusals(t *testing.T) {
	p := preset(t, "ckks-logn13").CKKS.Parameters
	for _, c := range []Config{{N: 1, T: 1, Self: 1}, {N: 3, T: 4, Self: 1}, {N: 3, T: 2, Self: 4}, {N: 17, T: 2, Self: 1}, {N: 3, T: 2, Self: 1, GaloisElements: []uint64{5, 3}}} {
		c.Params = p
		if _, err := NewSetup(c); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
	var crs [32]byte
	cfg := Config{Params: p, N: 2, T: 2, Self: 1, CRS: crs}
	s1, _ := NewSetup(cfg)
	cfg2 := cfg
	cfg2.Self = 2
	s2, _ := NewSetup(cfg2)
	b1, priv1, _ := s1.Round1()
	b2, _, _ := s2.Round1()
	if _, err := cfg.AggregateRound1([][]byte{b1}); err == nil {
		t.Error("a round-1 sum without party 2's message")
	}
	if _, err := cfg.AggregateRound1([][]byte{b1, b2[:len(b2)/2]}); err == nil {
		t.Error("a round-1 sum with a truncated message")
	}
	agg1, err := cfg.AggregateRound1([][]byte{b1, b2})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := s1.Finish(agg1[:len(agg1)-8], nil, map[int][]byte{2: priv1[2]}); err == nil {
		t.Error("Finish with a truncated sum")
	}
	if _, _, err := s2.Finish(agg1, nil, map[int][]byte{}); err == nil {
		t.Error("Finish without the Shamir share of party 1")
	}
	if _, _, err := s2.Finish(agg1, nil, map[int][]byte{1: priv1[2][:100]}); err == nil {
		t.Error("Finish with a malformed Shamir share")
	}
}

// TestTargetEncoding: a requester's public key round-trips, and one of
// another size or with a coefficient out of its limb's range is refused
// before anything is decoded.
func TestTargetEncoding(t *testing.T) {
	p := preset(t, "ckks-logn13").CKKS
	_, pk := rlwe.NewKeyGenerator(p).GenKeyPairNew()
	b := EncodeTarget(pk)
	back, err := DecodeTarget(p.Parameters, b)
	if err != nil || !back.Equal(pk) {
		t.Fatalf("round trip: %v", err)
	}
	if _, err := DecodeTarget(p.Parameters, b[:len(b)-8]); err == nil {
		t.Error("a short key was accepted")
	}
	bad := bytes.Clone(b)
	for i := range 8 {
		bad[i] = 0xff
	}
	if _, err := DecodeTarget(p.Parameters, bad); err == nil {
		t.Error("a coefficient above its modulus was accepted")
	}
}
