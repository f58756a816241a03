package threshold

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/tuneinsight/lattigo/v6/core/rlwe"
)

// hostileHeader returns b with the first vector-length header (the
// little-endian ring degree n) replaced by 2^43: the same total size,
// which decodeExact's length check accepts.
func hostileHeader(t testing.TB, b []byte, n int) []byte {
	t.Helper()
	hdr := binary.LittleEndian.AppendUint64(nil, uint64(n))
	i := bytes.Index(b, hdr)
	if i < 0 || i > 4096 {
		t.Fatalf("no vector header of %d in the first bytes", n)
	}
	out := bytes.Clone(b)
	binary.LittleEndian.PutUint64(out[i:], 1<<43)
	return out
}

// TestHostileHeadersOfTheRightSize: a message of exactly the right size
// whose inner vector-length header says 2^43 (a Shamir share from a
// party, a round-1 message or sum, a partial decryption the SDK
// combines) is refused; it does not kill the process (Lattigo allocates
// what the header says: fatal out of memory, which no recover catches).
// Each case runs in a child process so that a crash is a failure, not
// the end of the test binary.
func TestHostileHeadersOfTheRightSize(t *testing.T) {
	if c := os.Getenv("KMSD_HOSTILE_CASE"); c != "" {
		hostileChild(t, c)
		return
	}
	for _, c := range []string{"shamir", "round1", "agg1", "partial"} {
		t.Run(c, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestHostileHeadersOfTheRightSize$", "-test.count=1")
			cmd.Env = append(os.Environ(), "KMSD_HOSTILE_CASE="+c)
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), "REFUSED") {
				tail := string(out)
				if len(tail) > 600 {
					tail = tail[:600]
				}
				t.Fatalf("a hostile %s of the right size: %v\n%s", c, err, tail)
			}
		})
	}
}

func hostileChild(t *testing.T, which string) {
	p := preset(t, "ckks-logn13").CKKS.Parameters
	n := p.N()
	var crs [32]byte
	rand.Read(crs[:])
	setups := make([]*Setup, 4)
	r1 := map[int][]byte{}
	priv := map[int]map[int][]byte{1: {}, 2: {}, 3: {}}
	for j := 1; j <= 3; j++ {
		s, err := NewSetup(Config{Params: p, N: 3, T: 2, Self: j, Relinearization: true, GaloisElements: []uint64{5}, CRS: crs})
		if err != nil {
			t.Fatal(err)
		}
		setups[j] = s
		b, pr, err := s.Round1()
		if err != nil {
			t.Fatal(err)
		}
		r1[j] = b
		for to, m := range pr {
			priv[to][j] = m
		}
	}
	cfg := setups[1].cfg
	var err error
	switch which {
	case "round1":
		_, err = cfg.AggregateRound1([][]byte{r1[1], r1[2], hostileHeader(t, r1[3], n)})
	case "agg1", "shamir":
		agg1, err1 := cfg.AggregateRound1([][]byte{r1[1], r1[2], r1[3]})
		if err1 != nil {
			t.Fatal(err1)
		}
		if which == "agg1" {
			_, err = setups[1].Round2(hostileHeader(t, agg1, n))
			break
		}
		var r2 [][]byte
		for j := 1; j <= 3; j++ {
			b, err := setups[j].Round2(agg1)
			if err != nil {
				t.Fatal(err)
			}
			r2 = append(r2, b)
		}
		agg2, err2 := cfg.AggregateRound2(r2)
		if err2 != nil {
			t.Fatal(err2)
		}
		priv[1][2] = hostileHeader(t, priv[1][2], n)
		_, _, err = setups[1].Finish(agg1, agg2, priv[1])
	case "partial":
		_, pk := rlwe.NewKeyGenerator(p).GenKeyPairNew()
		ct := rlwe.NewCiphertext(p, 1, p.MaxLevel())
		_, shares, _ := runSetup(t, p, 2, 2, nil, false)
		good, err1 := PartialDecrypt(p, shares[1], []int{1, 2}, ct, pk, 10)
		if err1 != nil {
			t.Fatal(err1)
		}
		_, err = Combine(p, ct, [][]byte{good, hostileHeader(t, good, n)})
	}
	if err == nil {
		t.Fatal("accepted")
	}
	fmt.Println("REFUSED:", err)
}
