#!/usr/bin/perl
# Verify the DKIM signatures of one message (standard input) with Mail::DKIM, an implementation
# independent of the one that signed it, looking keys up on the DNS server given by --dns HOST:PORT.
# Prints one line per signature ("pass d=example.net a=rsa-sha256" or "fail d=... (reason)"), then the
# overall result; exits 0 only when that result is pass.
use strict;
use warnings;
use Getopt::Long;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my $dns = '';
GetOptions('dns=s' => \$dns) && $dns =~ /^([\d.]+):(\d+)$/
  or die "usage: $0 --dns HOST:PORT < message\n";
my $resolver = Net::DNS::Resolver->new(
    nameservers => [$1], port => $2, recurse => 0,
    retry => 2, udp_timeout => 2, tcp_timeout => 2,
);
Mail::DKIM::DNS::resolver($resolver);

binmode STDIN;
my $verifier = Mail::DKIM::Verifier->new();
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $verifier->PRINT($line);
}
$verifier->CLOSE;

for my $signature ($verifier->signatures) {
    my $detail = $signature->result_detail;
    $detail =~ s/^\S+\s*//;
    printf "%s d=%s a=%s%s\n", $signature->result, $signature->domain // '', $signature->algorithm // '',
      $detail ? " $detail" : '';
}
print 'result ', $verifier->result_detail, "\n";
exit($verifier->result eq 'pass' ? 0 : 1);
